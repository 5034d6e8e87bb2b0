# The local stack's environment: the emulator's test credentials, the doubles' addresses and the
# stack's local secrets. stack.sh sources it; so does a second terminal beside the stack, for the
# README's commands (billingd dlq list, billingd publish, billingd check …):
#   source deploy/local/env.sh
# Values already set are kept.
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_REGION="${AWS_REGION:-us-east-1}"
export STRIPE_SECRET_KEY="${STRIPE_SECRET_KEY:-sk_test_local_stack}"
export STRIPE_API_BASE="${STRIPE_API_BASE:-http://127.0.0.1:12111}"
export STRIPE_WEBHOOK_SECRET="${STRIPE_WEBHOOK_SECRET:-whsec_local_stack}"
export RAZORPAY_KEY_ID="${RAZORPAY_KEY_ID:-rzp_test_local}" RAZORPAY_KEY_SECRET="${RAZORPAY_KEY_SECRET:-local}"
export RAZORPAY_WEBHOOK_SECRET="${RAZORPAY_WEBHOOK_SECRET:-rzp_whsec_local_stack}"
export BILLINGD_LOG_FORMAT="${BILLINGD_LOG_FORMAT:-console}"
