"""billingd's test kit: run a handler through the real actor, and doubles that keep their
services' contracts. Also a pytest plugin (`billingd.testing.plugin`, entry point `pytest11`).

* `HandlerHarness`, `Result` — one handler on the in-memory source, a real Redis (`harness`);
* `StripeDouble`, `StripeContract` — the Stripe API double (`stripe`);
* `Sink`, `Double`, `Recorded` — an HTTP endpoint recording POSTs, and the base of the doubles
  (`server`).

Documented in docs/plugins.md.
"""

from billingd.testing.harness import HandlerHarness, Result
from billingd.testing.server import Double, Recorded, Sink
from billingd.testing.stripe import StripeContract, StripeDouble

__all__ = ["Double", "HandlerHarness", "Recorded", "Result", "Sink", "StripeContract", "StripeDouble"]
