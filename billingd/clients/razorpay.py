"""Razorpay webhook verification with the razorpay SDK (synchronous, so run in a worker thread).

Razorpay signs the raw webhook body with HMAC-SHA256 under the webhook secret and sends the hex
digest as `X-Razorpay-Signature` (Razorpay docs, "Validate webhooks").
"""

from __future__ import annotations

import anyio
import razorpay
from razorpay.errors import SignatureVerificationError

from billingd.config.model import RazorpaySettings


class RazorpayVerifier:
    """Verifies relayed Razorpay webhooks against `[razorpay].webhook_secret`."""

    def __init__(self, settings: RazorpaySettings) -> None:
        self._client = razorpay.Client(auth=(settings.key_id, settings.key_secret))
        self._secret = settings.webhook_secret

    @property
    def configured(self) -> bool:
        """Whether a webhook secret is set."""
        return bool(self._secret)

    async def verify(self, body: str, signature: str | None) -> bool:
        """Whether `signature` is Razorpay's signature of `body`."""
        if not signature or not self._secret:
            return False
        try:
            await anyio.to_thread.run_sync(self._client.utility.verify_webhook_signature, body, signature, self._secret)
        except SignatureVerificationError:
            return False
        return True
