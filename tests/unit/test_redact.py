"""Secrets never written (issue 26): the structural scrub, the by-value Redactor, and which values
of a configuration and environment count as secrets."""

from __future__ import annotations

import base64
import io
import json
from urllib.parse import quote

import structlog
from hypothesis import given
from hypothesis import strategies as st

from billingd.config.loader import parse_config
from billingd.config.secrets import secrets_of
from billingd.daemon.logging import configure_logging
from billingd.telemetry.redact import MASK, Redactor, bare_url, scrub


def test_the_structural_scrub_masks_url_passwords_credentials_and_keys():
    assert scrub("cannot connect to amqps://billingd:s3cr3t@mq.example.com:5671/vh") == (
        "cannot connect to amqps://billingd:****@mq.example.com:5671/vh"
    )
    assert scrub("POST https://hooks.example.com/x?code=abc123&v=2 failed") == (
        "POST https://hooks.example.com/x?code=****&v=2 failed"
    )
    assert scrub("{'Authorization': 'Bearer sk_live_abc'}") == "{'Authorization': 'Bearer ****'}"
    assert scrub("Proxy-Authorization: Basic dXNlcjpwYXNz") == "Proxy-Authorization: Basic ****"
    pem = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----"
    assert "MIIE" not in scrub(f"key: {pem}")
    assert scrub("redis://127.0.0.1:6379/0 and amqp://guest@host/") == "redis://127.0.0.1:6379/0 and amqp://guest@host/"


def test_a_bare_url_keeps_only_where_it_goes():
    assert bare_url("https://u:p@hooks.example.com:8443/api/x?code=abc") == "https://hooks.example.com:8443/api/x?…"
    assert bare_url("http://[::1]:80/p") == "http://[::1]:80/p"


def test_the_redactor_masks_known_values_in_every_form():
    secret = "sk_live_51Hqb9GJx2canary"
    redactor = Redactor([secret, "guest"])  # too short to mask by value: left to the structural rules
    assert redactor.scrub(f"key={secret}.") == f"key={MASK}."
    assert redactor.scrub(f"q={quote('p@ss word/+canary', safe='')}") != ""
    pair = Redactor(["p@ss word/+canary"])
    assert "p%40ss" not in pair.scrub(f"x={quote('p@ss word/+canary', safe='')}")
    assert redactor.scrub("guest") == "guest"
    assert redactor.scrub_obj({"a": [secret, (1, secret)]}) == {"a": [MASK, (1, MASK)]}


@given(
    secret=st.text(st.characters(blacklist_characters="*", blacklist_categories=("Cs",)), min_size=8, max_size=40),
    before=st.text(max_size=30),
    after=st.text(max_size=30),
)
def test_a_known_secret_never_survives_the_redactor(secret, before, after):
    assert secret not in Redactor([secret]).scrub(before + secret + after)


def test_the_secrets_of_a_configuration_and_the_environment(tmp_path):
    (tmp_path / "rzp").write_text("rzp_secret_from_file\n")
    text = f"""
[redis]
url = "redis://billingd:redis-url-password@db:6379/0"
[stripe]
api_key = "${{STRIPE_SECRET_KEY}}"
webhook_secret = "${{STRIPE_WEBHOOK_SECRET}}"
[razorpay]
key_secret = "${{file:{tmp_path}/rzp}}"
[[sources]]
name = "hooks"
type = "sqs"
queue_url = "https://sqs.us-east-1.amazonaws.com/1/q"
handler = "webhook_forward"
handler_options = {{ url = "https://hooks.example.com/in?code=forward-code-123", signing_secret = "hook-signing-1" }}
[[sources]]
name = "sms"
type = "amqp"
url = ["amqps://billingd:amqp-node-password@a:5671/", "amqps://billingd:amqp-node-password@b:5671/"]
exchange = "billing"
queue = "sms"
handler = "sms_billing"
"""
    environ = {
        "STRIPE_SECRET_KEY": "sk_test_key_canary",
        "STRIPE_WEBHOOK_SECRET": "whsec_canary_1",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-canary",
        "HTTPS_PROXY": "http://p:proxy-password-1@proxy:3128",
    }
    settings = parse_config(text, environ)
    found = secrets_of(settings, environ)
    assert {"sk_test_key_canary", "whsec_canary_1", "rzp_secret_from_file", "redis-url-password",
            "amqp-node-password", "forward-code-123", "hook-signing-1", "aws-secret-canary",
            "proxy-password-1"} <= found  # fmt: skip
    assert base64.b64encode(b"billingd:amqp-node-password").decode() in found


def test_logs_are_scrubbed_at_every_level_with_their_tracebacks():
    stream = io.StringIO()
    configure_logging("debug", "json", stream, Redactor(["sk_live_canary_logged"]))
    log = structlog.get_logger("test")
    log.debug("with a secret", value="sk_live_canary_logged", url="amqp://u:amqp-pass@h/")
    try:
        raise RuntimeError("boom sk_live_canary_logged")
    except RuntimeError:
        log.exception("failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    text = stream.getvalue()
    assert "sk_live_canary_logged" not in text and "amqp-pass" not in text
    assert lines[0]["value"] == MASK and "Traceback" in lines[1]["exception"]
    configure_logging("warning", "console")
