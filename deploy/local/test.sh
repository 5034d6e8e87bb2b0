#!/usr/bin/env bash
# The test command: services up, the locked environment synced, then the whole suite.
# Extra arguments go to pytest (e.g. deploy/local/test.sh -k drain).
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/local/services.sh
command -v uv >/dev/null || python3 -m pip install --quiet uv
uv sync --frozen --quiet --compile-bytecode  # billingd processes start in ~1 s, not ~2
# bytecode of the work tree's modules goes to the cache directory: the tests write nothing here
export PYTHONPYCACHEPREFIX="${BILLINGD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/billingd}/pycache"
exec uv run pytest "$@"
