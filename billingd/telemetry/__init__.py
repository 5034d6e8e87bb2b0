"""What every layer reports to: the Prometheus metrics of a daemon and the status of its sources.

At the bottom of the dependency order (it imports nothing of billingd), so supervisors, sources,
handlers and the daemon can all see it."""

from billingd.telemetry.metrics import Metrics, SourceCounter, SourceMetrics
from billingd.telemetry.status import SourceStatus

__all__ = ["Metrics", "SourceCounter", "SourceMetrics", "SourceStatus"]
