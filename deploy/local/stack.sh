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

export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export STRIPE_SECRET_KEY="${STRIPE_SECRET_KEY:-sk_test_local_stack}"
export STRIPE_API_BASE="${STRIPE_API_BASE:-http://127.0.0.1:12111}"
export STRIPE_WEBHOOK_SECRET="${STRIPE_WEBHOOK_SECRET:-whsec_local_stack}"
export RAZORPAY_KEY_ID="${RAZORPAY_KEY_ID:-rzp_test_local}" RAZORPAY_KEY_SECRET="${RAZORPAY_KEY_SECRET:-local}"
export RAZORPAY_WEBHOOK_SECRET="${RAZORPAY_WEBHOOK_SECRET:-rzp_whsec_local_stack}"
export BILLINGD_LOG_FORMAT="${BILLINGD_LOG_FORMAT:-console}"

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
uv run python -m tests.doubles.serve --stripe-port 12111 --sink-port 12112 &
pids+=($!)
uv run python deploy/local/traffic.py &
pids+=($!)
echo "[stack] billingd on billingd.toml; metrics at http://127.0.0.1:9464/metrics;" \
     "Stripe meter events at http://127.0.0.1:12111/_double/requests (Ctrl-C to stop)" >&2
uv run billingd run --config billingd.toml
