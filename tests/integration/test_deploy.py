"""deploy/: the systemd unit, Kubernetes manifests, container image, alerts and dashboard are valid,
agree with billingd, and a real Prometheus scrapes real values from a running billingd."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import anyio
import kubernetes_validate
import pytest
import yaml

from billingd.config import parse_config
from billingd.config.durations import parse_duration
from billingd.telemetry.metrics import Metrics
from tests.seed002 import dlr
from tests.support import amqp_source, free_port, make_settings, running, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.37.0"


def run(*command: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


# -- systemd -----------------------------------------------------------------------------------


def test_systemd_unit_verifies_cleanly(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "systemd" / "billingd.service").read_text()
    for key in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "KillMode=mixed",
        "EnvironmentFile=",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LoadCredential=stripe-secret-key:",
    ):
        assert key in unit, key
    stop = int(re.search(r"TimeoutStopSec=(\d+)s", unit).group(1))
    assert stop > parse_duration("25s") + 5  # drain_timeout + abort grace
    # verify with ExecStart pointing at this checkout's billingd (verify checks the binary exists)
    local = tmp_path / "billingd.service"
    local.write_text(unit.replace("/opt/billingd/.venv/bin/billingd", str(Path(sys.executable).parent / "billingd")))
    result = run("systemd-analyze", "verify", "--man=no", str(local))
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


# -- Kubernetes --------------------------------------------------------------------------------


def k8s_documents() -> list[dict]:
    """The kustomization rendered: kubectl kustomize when installed, else its resources and
    generated ConfigMaps assembled here (the same objects, without name hashes)."""
    if shutil.which("kubectl"):
        rendered = run("kubectl", "kustomize", str(K8S))
        assert rendered.returncode == 0, rendered.stderr
        return [d for d in yaml.safe_load_all(rendered.stdout) if d]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    documents = [d for name in kustomization["resources"] for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    for generator in kustomization["configMapGenerator"]:
        data = {f: (K8S / f).read_text() for f in generator.get("files", [])}
        data.update(line.split("=", 1) for line in generator.get("literals", []))
        documents.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
        )
    return documents


def by_kind(documents: list[dict], kind: str) -> list[dict]:
    return [d for d in documents if d["kind"] == kind]


def test_kubernetes_manifests_are_valid_against_the_schemas():
    documents = k8s_documents()
    kinds = {d["kind"] for d in documents}
    assert kinds >= {
        "Deployment",
        "ConfigMap",
        "ServiceAccount",
        "PodDisruptionBudget",
        "PodMonitor",
        "ScaledObject",
        "TriggerAuthentication",
    }
    secret = yaml.safe_load((K8S / "secret-template.yaml").read_text())
    for document in [*documents, secret]:
        if "." in document["apiVersion"].split("/")[0] and document["apiVersion"].split("/")[0] not in (
            "apps",
            "policy",
            "batch",
        ):
            continue  # CRDs (monitoring.coreos.com, keda.sh): checked field by field below
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_the_deployment_drains_probes_and_runs_unprivileged(tmp_path):
    documents = k8s_documents()
    [deployment] = by_kind(documents, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    config = next(d for d in by_kind(documents, "ConfigMap") if d["metadata"]["name"].startswith("billingd-config"))
    env = next(d for d in by_kind(documents, "ConfigMap") if d["metadata"]["name"].startswith("billingd-env"))
    secret = yaml.safe_load((K8S / "secret-template.yaml").read_text())
    # the Secret is mounted as files; the config reads each with ${file:<mount>/<key>}
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "secrets"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "secrets"]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"] and volume["secret"]["defaultMode"] == 0o400
    for name, value in secret["stringData"].items():
        (tmp_path / name).write_text(value)
    text = config["data"]["billingd.toml"]
    assert "${file:" + mount["mountPath"] + "/stripe-secret-key}" in text
    settings = parse_config(text.replace(mount["mountPath"], str(tmp_path)), env["data"])
    assert settings.stripe.api_key == secret["stringData"]["stripe-secret-key"]
    assert not any(e.get("secretRef") for e in container.get("envFrom", []))  # secrets never in the environment
    assert pod["terminationGracePeriodSeconds"] > settings.daemon.drain_timeout + 5
    assert settings.http.host == "0.0.0.0"
    port = next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"]
    assert port == settings.http.port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    [pdb] = by_kind(documents, "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [monitor] = by_kind(documents, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    [scaled] = by_kind(documents, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] <= deployment["spec"]["replicas"] <= scaled["spec"]["maxReplicaCount"]
    queues = {getattr(s, "queue", None) for s in settings.sources}
    env_names = set(env["data"]) | {e["name"] for e in container["env"]}
    for trigger in scaled["spec"]["triggers"]:
        metadata = trigger["metadata"]
        if trigger["type"] == "aws-sqs-queue":  # KEDA docs: queueURL or queueURLFromEnv, awsRegion required
            assert metadata["queueURLFromEnv"] in env_names and metadata["awsRegion"] and int(metadata["queueLength"])
        else:
            assert trigger["type"] == "rabbitmq"  # KEDA docs: host(FromEnv), queueName, mode, value
            assert metadata["hostFromEnv"] in env_names and metadata["mode"] == "QueueLength"
            assert metadata["queueName"] in queues and float(metadata["value"]) > 0
    [auth] = by_kind(documents, "TriggerAuthentication")
    assert auth["spec"]["podIdentity"]["provider"] == "aws"


# -- container image -----------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_unprivileged_and_exec_form():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) == 2 and " AS build" in dockerfile
    assert "uv sync --frozen --no-dev" in dockerfile
    user = re.search(r"^USER (\S+)", dockerfile, re.M).group(1)
    assert not user.startswith(("0", "root"))
    assert re.search(r"^STOPSIGNAL SIGTERM$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["billingd"\]$', dockerfile, re.M)  # exec form: billingd is PID 1


# -- alerts and dashboard --------------------------------------------------------------------------


SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "summary": ("", "_count", "_sum", "_created"),
}


def exported_metric_names() -> set[str]:
    """The series names of every metric family billingd registers (labelled ones included)."""
    return {family.name + suffix for family in Metrics("test").registry.collect() for suffix in SUFFIXES[family.type]}


def used_metric_names(expressions: list[str]) -> set[str]:
    names = set()
    for expression in expressions:
        cleaned = re.sub(r"\{[^}]*\}", "", expression)  # drop label matchers
        cleaned = re.sub(r'"[^"]*"', "", cleaned)
        names |= set(re.findall(r"\b(?:billingd|process|python)_[a-z_]+\b|\bup\b", cleaned))
    return names


def alert_expressions() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "billingd.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return expressions


def test_alert_rules_pass_promtool_and_behave_as_intended():
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    checked = run("promtool", "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run("promtool", "test", "rules", "alerts_test.yml", cwd=ROOT / "tests" / "prometheus")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_metric_the_alerts_and_dashboard_use_is_one_billingd_exports():
    exported = exported_metric_names()
    used = used_metric_names(alert_expressions() + dashboard_expressions())
    assert used - {"up"} <= exported, used - {"up"} - exported  # `up` is Prometheus's own series for the scrape
    covered = {n for n in used if n.startswith("billingd_")}
    for needed in (
        "billingd_messages_processed_total",
        "billingd_message_duration_seconds_bucket",
        "billingd_messages_in_flight",
        "billingd_circuit_breaker_state",
        "billingd_source_up",
        "billingd_actor_restarts_total",
        "billingd_queue_depth",
        "billingd_draining",
    ):
        assert needed in covered, needed


# -- a real Prometheus ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_real_prometheus_scrapes_billingd(amqp, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    source = amqp.track(amqp_source("sms_dlr"))
    settings = make_settings([source])
    web = free_port()
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
                "scrape_configs": [{"job_name": "billingd", "static_configs": [{"targets": [settings.http.listen]}]}],
            }
        )
    )
    process = await anyio.open_process(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
            "--log.level=warn",
        ]
    )
    try:
        async with running(settings) as daemon, aiohttp.ClientSession() as http:

            async def query(promql: str) -> list:
                try:
                    async with http.get(f"http://127.0.0.1:{web}/api/v1/query", params={"query": promql}) as r:
                        return (await r.json())["data"]["result"] if r.status == 200 else []
                except aiohttp.ClientError:
                    return []

            for i in range(12):
                await amqp.publish(source["exchange"], "dlr.x", dlr(f"prom-{i}", "DELIVRD"))
            acked = daemon.metrics.processed.labels(source["name"], "ack")
            await wait_for(lambda: acked._value.get() == 12, what="12 processed")
            promql = f'billingd_messages_processed_total{{job="billingd",source="{source["name"]}",outcome="ack"}}'

            async def scraped() -> bool:
                result = await query(promql)
                return bool(result) and float(result[0]["value"][1]) == 12

            await wait_for(scraped, timeout=30, interval=0.5, what="Prometheus has the processed count")
            async with http.get(f"http://127.0.0.1:{web}/api/v1/rules") as response:
                groups = (await response.json())["data"]["groups"]
            [group] = [g for g in groups if g["name"] == "billingd"]
            assert all(rule["health"] == "ok" for rule in group["rules"])
            up = await query('up{job="billingd"}')
            assert float(up[0]["value"][1]) == 1
    finally:
        process.terminate()
        await process.wait()
