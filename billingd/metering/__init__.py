"""Metering beside the handlers: the outbox sender that drains meter events into Stripe, and the
reconciler that proves Stripe's totals equal what billingd acked (DESIGN §10)."""
