"""Create the local stack's SQS queues on whichever emulator answers (fauxqs, moto, LocalStack).

    uv run python deploy/local/sqs_queues.py [--endpoint http://127.0.0.1:4566] [--init FILE]

Reads the queues of `deploy/local/fauxqs-init.json` (fauxqs's own init format) and makes them
exist with their attributes: `CreateQueue` with no attributes is idempotent (it returns the URL
of a queue that already exists), then `SetQueueAttributes` applies the visibility timeout and the
redrive policy. The policy's `deadLetterTargetArn` is rewritten to the ARN this emulator gave the
dead-letter queue (account ids and regions differ between emulators). Queues are created in file
order, so each dead-letter queue exists before the queue that redrives into it.

Exit status 0 when every queue exists with its attributes, 1 with the failing queue named.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import aioboto3

HERE = os.path.dirname(os.path.abspath(__file__))


async def ensure_queues(endpoint: str, queues: list[dict[str, Any]]) -> list[str]:
    """Create or update each queue of `queues` (fauxqs init entries); returns their queue URLs."""
    session = aioboto3.Session(
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
    )
    arns: dict[str, str] = {}
    urls = []
    async with session.client("sqs", endpoint_url=endpoint) as sqs:
        for queue in queues:
            name = queue["name"]
            created = {"FifoQueue": "true"} if name.endswith(".fifo") else {}
            url = (await sqs.create_queue(QueueName=name, Attributes=created))["QueueUrl"]
            attributes = dict(queue.get("attributes", {}))
            if "RedrivePolicy" in attributes:
                policy = json.loads(attributes["RedrivePolicy"])
                target = policy["deadLetterTargetArn"].rsplit(":", 1)[-1]
                if target not in arns:
                    raise RuntimeError(f"{name}: its dead-letter queue {target} must come earlier in the file")
                policy["deadLetterTargetArn"] = arns[target]
                attributes["RedrivePolicy"] = json.dumps(policy)
            if attributes:
                await sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
            got = await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
            arns[name] = got["Attributes"]["QueueArn"]
            urls.append(url)
    return urls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"))
    parser.add_argument("--init", default=os.path.join(HERE, "fauxqs-init.json"))
    args = parser.parse_args()
    with open(args.init) as file:
        queues = json.load(file)["queues"]
    try:
        urls = asyncio.run(ensure_queues(args.endpoint, queues))
    except Exception as exc:  # noqa: BLE001 - one line that says what failed, for a shell script
        sys.stderr.write(f"[sqs] creating the queues at {args.endpoint} failed: {type(exc).__name__}: {exc}\n")
        return 1
    sys.stderr.write(f"[sqs] {len(urls)} queues ready at {args.endpoint} (with their DLQs and redrive policies)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
