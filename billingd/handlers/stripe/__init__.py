"""Stripe events (seeds 003, 004): `stripe_events` (entitlements and invoices from Stripe's events),
the objects read from them (`stripe_objects`), meter error reports (`meter_errors`), relayed
webhooks (`webhooks`) and their relay (`webhook_forward`)."""
