"""billingd: a worker daemon that applies billing events from SQS and RabbitMQ exactly once."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("billingd")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
