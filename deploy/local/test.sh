#!/usr/bin/env bash
# The test command: services up, the locked environment synced, then the whole suite.
# Extra arguments go to pytest (e.g. deploy/local/test.sh -k drain).
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/local/services.sh
command -v uv >/dev/null || python3 -m pip install --quiet uv
uv sync --frozen --quiet --compile-bytecode  # billingd processes start in ~1 s, not ~2
# no bytecode written next to the work tree's modules: the tests write nothing here (compiling
# billingd's own modules costs a process ~50 ms; the virtualenv's bytecode, compiled by uv sync,
# is still used — a PYTHONPYCACHEPREFIX would ignore it and cost every process a second)
export PYTHONDONTWRITEBYTECODE=1
exec uv run pytest "$@"
