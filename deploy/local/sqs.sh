#!/usr/bin/env bash
# Start fauxqs (an SQS emulator speaking the real wire protocol) on 127.0.0.1:4566 unless
# something already answers there (another project's fauxqs, moto or LocalStack), then create the
# queues of deploy/local/fauxqs-init.json on whichever emulator it is, idempotently, with their
# DLQs and redrive policies (deploy/local/sqs_queues.py).
# Installs fauxqs@1.9.2 from npm (the last version that runs on Node 20) into the cache directory,
# ${BILLINGD_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/billingd}, where the tests find it too; its log
# and pid are there as well.
set -euo pipefail
cd "$(dirname "$0")/../.."
port="${FAUXQS_PORT:-4566}"
create_queues() {
  command -v uv >/dev/null || python3 -m pip install --quiet uv
  uv run --frozen --quiet python deploy/local/sqs_queues.py --endpoint "http://127.0.0.1:${port}"
}
# any HTTP answer counts (LocalStack and moto have no /health): curl without -f
if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:${port}/"; then
  echo "[sqs] an SQS emulator already answers on ${port}: using it" >&2
  create_queues; exit
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  if [[ $(id -u) -ne 0 ]]; then echo "[sqs] node and npm are missing: install Node.js 20 or later" >&2; exit 1; fi
  echo "[sqs] installing nodejs and npm" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if ((major < 20)); then
  echo "[sqs] fauxqs needs Node.js 20 or later, this is $(node -v): install a newer nodejs (e.g. from NodeSource)" >&2
  exit 1
fi
cache="${BILLINGD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/billingd}"
prefix="$cache/fauxqs-1.9.2"
mkdir -p "$prefix"
if [[ ! -f "$prefix/node_modules/fauxqs/dist/cli.js" ]]; then
  echo "[sqs] installing fauxqs@1.9.2 into $prefix" >&2
  npm install --silent --no-audit --no-fund --prefix "$prefix" fauxqs@1.9.2 >/dev/null
fi
FAUXQS_PORT="$port" FAUXQS_LOGGER=false FAUXQS_INIT="deploy/local/fauxqs-init.json" \
  nohup node "$prefix/node_modules/fauxqs/dist/cli.js" >"$cache/fauxqs.log" 2>&1 &
echo $! >"$cache/fauxqs.pid"
for _ in $(seq 100); do curl -fs "http://127.0.0.1:${port}/health" >/dev/null 2>&1 && break; sleep 0.1; done
echo "[sqs] fauxqs on 127.0.0.1:${port}" >&2
create_queues
