"""`QueueTools` for SQS: `dead_letter_queue_url` → `queue_url`, each letter deleted after its copy is sent."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from typing import Any

from billingd.config.model import SqsSourceSettings
from billingd.sources.codecs import encode_body
from billingd.sources.letters import Letter, read_sqs, replay_sqs_attributes
from billingd.sources.sqs_client import sqs_client


class SqsTools:
    """See `billingd.sources.tools`."""

    def __init__(self, settings: SqsSourceSettings) -> None:
        self._settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> SqsTools:
        s = self._settings
        self._client = await self._stack.enter_async_context(sqs_client(s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @property
    def _dlq(self) -> str:
        if not self._settings.dead_letter_queue_url:
            raise LookupError(f"source {self._settings.name} has no dead_letter_queue_url")
        return self._settings.dead_letter_queue_url

    async def dead_letter_count(self) -> int:
        attributes = (
            await self._client.get_queue_attributes(
                QueueUrl=self._dlq,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])

    async def _receive(self, count: int, visibility: int) -> list[dict[str, Any]]:
        response = await self._client.receive_message(
            QueueUrl=self._dlq,
            MaxNumberOfMessages=min(10, count),
            WaitTimeSeconds=1,
            VisibilityTimeout=visibility,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["MessageGroupId"],
        )
        messages: list[dict[str, Any]] = response.get("Messages", [])
        return messages

    async def sample(self, limit: int) -> list[Letter]:
        seen: list[dict[str, Any]] = []
        while len(seen) < limit and (batch := await self._receive(limit - len(seen), 30)):
            seen += batch
        for start in range(0, len(seen), 10):  # visible again at once: listing hides nothing
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                for i, m in enumerate(seen[start : start + 10])
            ]
            await self._client.change_message_visibility_batch(QueueUrl=self._dlq, Entries=entries)
        return [read_sqs(m) for m in seen]

    async def replay(self, limit: int | None) -> int:
        s = self._settings
        budget = await self.dead_letter_count() if limit is None else limit
        fifo = s.fifo
        moved = 0
        while moved < budget and (batch := await self._receive(budget - moved, 60)):
            entries = []
            for i, m in enumerate(batch):
                attributes = replay_sqs_attributes(m)
                entry: dict[str, Any] = {"Id": str(i), "MessageBody": m["Body"], "MessageAttributes": attributes}
                if fifo:
                    entry["MessageGroupId"] = m.get("Attributes", {}).get("MessageGroupId") or s.name
                    entry["MessageDeduplicationId"] = m["MessageId"]
                entries.append(entry)
            response = await self._client.send_message_batch(QueueUrl=s.queue_url, Entries=entries)
            sent = [batch[int(r["Id"])] for r in response.get("Successful", [])]
            if sent:  # only what the source queue accepted leaves the DLQ
                await self._client.delete_message_batch(
                    QueueUrl=self._dlq,
                    Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(sent)],
                )
            moved += len(sent)
            if len(sent) < len(batch):
                raise RuntimeError(
                    f"the source queue refused {len(batch) - len(sent)} message(s); they stay in the DLQ"
                )
        return moved

    async def publish(
        self,
        body: bytes,
        *,
        routing_key: str | None,
        encoding: str | None,
        group: str | None,
        trace: Mapping[str, str] | None = None,
    ) -> str:
        s = self._settings
        kwargs: dict[str, Any] = {
            "QueueUrl": s.queue_url,
            "MessageBody": encode_body(body, encoding, text_transport=True).decode(),
        }
        attributes = {name: {"DataType": "String", "StringValue": value} for name, value in (trace or {}).items()}
        if encoding:
            attributes["content_encoding"] = {"DataType": "String", "StringValue": encoding}
        if attributes:
            kwargs["MessageAttributes"] = attributes
        if s.fifo:
            kwargs["MessageGroupId"] = group or "billingd-publish"
            kwargs["MessageDeduplicationId"] = uuid.uuid4().hex
        return str((await self._client.send_message(**kwargs))["MessageId"])
