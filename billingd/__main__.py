"""`python -m billingd` — the same CLI as the `billingd` script."""

from billingd.daemon.cli import main

raise SystemExit(main())
