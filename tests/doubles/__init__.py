"""HTTP doubles of the services billingd calls, started by tests (and the local stack) on loopback."""
