"""Benchmark: the cost of traces — AMQP seed-002 DLRs through billingd with traces off, on at
sampling ratio 0.01 and on at 1.0, exporting to a real OTLP/HTTP receiver in its own process.

    uv run python bench/tracing.py [--messages 20000] [--rounds 3]

Each contender is `bench/contenders.py amqp-billingd` in its own process (uvloop, prefetch 20),
the three modes interleaved round by round; the best round of each is reported with its CPU per
message. Traces on: `OTEL_TRACES_EXPORTER=otlp`, `OTEL_TRACES_SAMPLER=parentbased_traceidratio`
with `OTEL_TRACES_SAMPLER_ARG`; the spans go to `python -m tests.doubles.otlp`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.compare import ROOT, amqp_queue, drop_amqp
from tests.support import free_port

MODES: dict[str, dict[str, str]] = {
    "off": {"OTEL_SDK_DISABLED": "true"},
    "ratio-0.01": {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                       "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "ratio-1.0": {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                      "OTEL_TRACES_SAMPLER_ARG": "1.0"},
}  # fmt: skip


def contend(args: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.contenders", "amqp-billingd", json.dumps(args)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    args = parser.parse_args()
    modes = {name: MODES[name] for name in args.modes.split(",")}
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "tests.doubles.otlp", "--port", str(port)], cwd=ROOT)
    await asyncio.sleep(2)
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_SERVICE_NAME": "billingd-bench"}
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    try:
        for round_ in range(args.rounds):
            for mode, env in modes.items():
                source = await amqp_queue("dlr", args.messages, 20)
                result = await asyncio.to_thread(contend, {"source": source, "n": args.messages}, {**endpoint, **env})
                await drop_amqp(source)
                results[mode].append(result)
                print(f"round {round_ + 1} {mode:15}: {result['rate']:8,.0f} msg/s  "
                      f"{result['cpu_us']:6.0f} µs CPU/msg", flush=True)  # fmt: skip
    finally:
        receiver.terminate()
    base = max(r["rate"] for r in results["off"])
    print("\n| traces | msg/s (best of rounds) | vs off | CPU µs/msg |\n|---|---|---|---|")
    for mode, rows in results.items():
        best = max(rows, key=lambda r: r["rate"])
        print(f"| {mode} | {best['rate']:,.0f} | {best['rate'] / base - 1:+.1%} | {best['cpu_us']:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
