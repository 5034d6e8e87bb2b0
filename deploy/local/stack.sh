#!/usr/bin/env bash
# The local stack: Redis, RabbitMQ and an SQS emulator (fauxqs) on loopback, doubles of Stripe and
# the marketplace endpoint, billingd on ./billingd.toml in the foreground, and sample traffic of
# every seed flowing into its queues. Ctrl-C drains billingd and stops the rest.
# Watch it work:  curl -s 127.0.0.1:9464/metrics | grep billingd_messages_processed_total
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/local/services.sh
command -v uv >/dev/null || python3 -m pip install --quiet uv
uv sync --frozen --quiet --compile-bytecode  # billingd processes start in ~1 s, not ~2
deploy/local/sqs.sh

# shellcheck source=deploy/local/env.sh
source deploy/local/env.sh   # a second terminal sources it too, for the README's commands

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
uv run python -m tests.doubles.serve --stripe-port 12111 --sink-port 12112 &
pids+=($!)
uv run python deploy/local/traffic.py &
pids+=($!)
echo "[stack] billingd on billingd.toml; metrics at http://127.0.0.1:9464/metrics;" \
     "Stripe meter events at http://127.0.0.1:12111/_double/requests (Ctrl-C to stop);" \
     "in another terminal: source deploy/local/env.sh" >&2
uv run billingd run --config billingd.toml
