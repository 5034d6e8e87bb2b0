"""The SQS batch calls of a source: deletes, visibility changes and dead letters, 10 entries at a
time, failed entries retried one by one, every call counted (`billingd_broker_requests_total`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from botocore.exceptions import ClientError

from billingd.config.model import SqsSourceSettings
from billingd.sources.base import Settlement
from billingd.sources.sqs_wire import TRANSIENT as _TRANSIENT
from billingd.sources.sqs_wire import chunks, dead_letter_entry

log = structlog.get_logger("billingd.sources.sqs")


class SqsCalls:
    """Batch calls on one source's queue and DLQ; `call(operation, **kwargs)` makes one API call."""

    def __init__(
        self,
        settings: SqsSourceSettings,
        call: Callable[..., Awaitable[dict[str, Any]]],
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.name = settings.name
        self._settings = settings
        self._call = call
        self._draining = draining

    async def delete(self, messages: list[dict[str, Any]]) -> None:
        """`DeleteMessageBatch` (failed entries deleted one by one)."""
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
        failed = await self._batch("DeleteMessageBatch", entries)
        for entry in failed or ():
            await self._single("DeleteMessage", ReceiptHandle=entry["ReceiptHandle"])

    async def change_visibility(self, changes: list[tuple[dict[str, Any], int]]) -> set[str]:
        """Change visibilities; returns the receipt handles changed."""
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": seconds}
            for i, (m, seconds) in enumerate(changes)
        ]
        failed = await self._batch("ChangeMessageVisibilityBatch", entries)
        if failed is None:
            return set()
        done = {e["ReceiptHandle"] for e in entries} - {e["ReceiptHandle"] for e in failed}
        for entry in failed:
            if await self._single(
                "ChangeMessageVisibility",
                ReceiptHandle=entry["ReceiptHandle"],
                VisibilityTimeout=entry["VisibilityTimeout"],
            ):
                done.add(entry["ReceiptHandle"])
        return done

    async def _batch(self, operation: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Run a batch call; return the entries to retry one by one (transient failures), or None
        when the call went unanswered while draining (nothing is retried: see below)."""
        if not entries:
            return []
        try:
            response = await self._call(operation, QueueUrl=self._settings.queue_url, Entries=entries)
        except (ClientError, *_TRANSIENT) as exc:
            if self._draining() and not isinstance(exc, ClientError):
                # SQS (or a proxy) is not answering and the drain has no time for ten more calls:
                # these messages come back when their visibility ends (a delete's effect is done,
                # so its redelivery is acked as a duplicate)
                log.warning(
                    "sqs batch call unanswered while draining; its messages return with their visibility",
                    source=self.name,
                    operation=operation,
                    entries=len(entries),
                    error=str(exc) or type(exc).__name__,
                )
                return None
            log.warning(
                "sqs batch call failed; retrying entries one by one",
                source=self.name,
                operation=operation,
                error=str(exc),
            )
            return entries
        by_id = {e["Id"]: e for e in entries}
        retry = []
        for failure in response.get("Failed", []):
            if failure.get("SenderFault"):  # e.g. an expired receipt: the message comes back anyway
                log.info(
                    "sqs entry refused",
                    source=self.name,
                    operation=operation,
                    code=failure.get("Code"),
                    error=failure.get("Message"),
                )
            else:
                retry.append(by_id[failure["Id"]])
        return retry

    async def _single(self, operation: str, **kwargs: Any) -> bool:
        try:
            await self._call(operation, QueueUrl=self._settings.queue_url, **kwargs)
        except (ClientError, *_TRANSIENT) as exc:
            log.warning(
                "sqs call failed; the message will be redelivered",
                source=self.name,
                operation=operation,
                error=str(exc),
            )
            return False
        return True

    async def send_dead_letters(self, dead: list[Settlement]) -> set[int]:
        """Send to the DLQ; returns the indexes (into `dead`) that the DLQ accepted.

        Calls stay under SQS's batch limits (10 entries, `MAX_BATCH_BYTES`); an entry the DLQ
        refuses for its content (too large with our attributes) is sent once more in its minimal
        form: the original body, `content_encoding`, and billingd's attributes only."""
        entries = [dead_letter_entry(str(i), s, self._settings, keep_theirs=True) for i, s in enumerate(dead)]
        accepted: set[int] = set()
        refused: list[int] = []
        for chunk in chunks(entries):
            ok, failed = await self._send_batch(chunk)
            accepted |= ok
            refused += failed
        for i in refused:
            ok, _ = await self._send_batch([dead_letter_entry(str(i), dead[i], self._settings, keep_theirs=False)])
            accepted |= ok
            if not ok:
                log.error(
                    "dead letter refused by the DLQ even without its attributes; it stays in the queue",
                    source=self.name,
                    message_id=dead[i].delivery.message_id,
                )
        return accepted

    async def _send_batch(self, entries: list[dict[str, Any]]) -> tuple[set[int], list[int]]:
        """One `SendMessageBatch` to the DLQ: `(accepted, refused for their content)` entry ids as ints."""
        try:
            response = await self._call(
                "SendMessageBatch", QueueUrl=self._settings.dead_letter_queue_url, Entries=entries
            )
        except (ClientError, *_TRANSIENT) as exc:
            log.error("sending dead letters failed; they will be retried", source=self.name, error=str(exc))
            return set(), []
        refused = []
        for failure in response.get("Failed", []):
            log.error(
                "dead letter refused by the DLQ",
                source=self.name,
                code=failure.get("Code"),
                error=failure.get("Message"),
            )
            if failure.get("SenderFault"):
                refused.append(int(failure["Id"]))
        return {int(r["Id"]) for r in response.get("Successful", [])}, refused
