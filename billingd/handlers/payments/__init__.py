"""Payments collected outside Stripe (seed 004): `payment_events`, and paying one invoice once
(`invoice_payer`)."""
