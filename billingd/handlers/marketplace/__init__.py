"""The billing service's product updates to the marketplace (seed 000): `billing_sync`."""
