"""Benchmark: decoding a usage event as CloudEvents against the native format, in the same run.

    uv run python bench/cloudevents_decode.py [--events 20000]

CPU per event (µs) of what the `usage` handler does before its Redis step: the native body through
its msgspec decoder, and the same event as a CloudEvent — structured, binary (AMQP
`cloudEvents_` properties) and in a batch of 100 — through `cloud_events` and the conversion to
the native struct. Bodies are made by the official `cloudevents` SDK.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import msgspec
from cloudevents.core.bindings import amqp as ce_amqp
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from billingd.handlers.kit.base import JsonDecoder
from billingd.handlers.usage.cloudevents import CloudEventsOptions, cloud_events
from billingd.handlers.usage.usage import UsageEvent

OPTIONS = CloudEventsOptions(type_prefix="com.example.usage.")


def per_event(label: str, count: int, events_per_call: int, call: Callable[[], object]) -> float:
    calls = max(1, count // events_per_call)
    started = time.process_time()
    for _ in range(calls):
        call()
    micros = (time.process_time() - started) / (calls * events_per_call) * 1e6
    print(f"{label:<34} {micros:7.2f} µs/event")
    return micros


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000)
    count = parser.parse_args().events
    fmt = JSONFormat()
    attributes = {"type": "com.example.usage.ai_credits", "source": "https://gw.example.com", "subject": "ws_1"}
    event = CloudEvent({**attributes, "id": "e-1"}, {"value": 5, "stripe_customer_id": "cus_1"})
    native = msgspec.json.encode({"event_type": "ai_credits", "workspace_id": "ws_1", "value": 5,
                                  "idempotency_key": "e-1", "stripe_customer_id": "cus_1"})  # fmt: skip
    structured = fmt.write(event)
    binary = ce_amqp.to_binary(event, fmt)
    batch = (
        b"[" + b",".join(fmt.write(CloudEvent({**attributes, "id": f"e-{i}"}, {"value": i})) for i in range(100)) + b"]"
    )
    decoder = JsonDecoder(UsageEvent)

    def ce(body: bytes, props: dict[str, object]) -> Callable[[], object]:
        return lambda: [msgspec.convert(u, UsageEvent) for u in cloud_events(body, props, OPTIONS) or []]

    for round_ in range(3):
        print(f"round {round_ + 1}")
        base = per_event("native JSON (baseline)", count, 1, lambda: decoder.decode(native))
        for label, n, call in (
            ("CloudEvents structured", 1, ce(structured, {})),
            ("CloudEvents binary (AMQP)", 1, ce(binary.application_data, binary.application_properties)),
            ("CloudEvents batch of 100", 100, ce(batch, {})),
        ):
            micros = per_event(label, count, n, call)
            print(f"{'':<34} {micros / base:7.2f} × native")


if __name__ == "__main__":
    main()
