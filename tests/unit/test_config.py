"""Config: every error with its TOML path, env expansion, durations, secrets, defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billingd.config import ConfigError, format_duration, load_config, parse_config, parse_duration

ROOT = Path(__file__).resolve().parents[2]
A_SOURCE = """
[[sources]]
name = "u"
type = "sqs"
handler = "usage"
queue_url = "http://127.0.0.1:4566/000000000000/q"
"""


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env or {})
    return caught.value.errors


def test_the_default_config_is_valid_and_matches_seed_002():
    settings = load_config(ROOT / "billingd.toml", environ={})
    billing, dlr = settings.source("sms-billing"), settings.source("sms-dlr")
    assert (billing.exchange, billing.queue, billing.routing_keys, billing.prefetch) == (
        "billing",
        "billing_service.submit_sm_resp",
        ["bill_request.submit_sm_resp.#"],
        10,
    )
    assert (dlr.exchange, dlr.queue, dlr.routing_keys, dlr.prefetch) == (
        "messaging",
        "billing_service.dlr",
        ["dlr.#"],
        20,
    )
    for source in (billing, dlr):
        assert source.queue_arguments == {"x-message-ttl": 86_400_000, "x-max-length": 100_000}
    assert settings.daemon.drain_timeout == 25
    assert settings.breaker("redis").reset_timeout == 5
    usage, sync = settings.source("usage-events"), settings.source("billing-to-posthog")
    assert usage.queue_url == "http://sqs.us-east-1.localhost:4566/000000000000/billing-usage-events"
    assert (usage.handler, usage.prefetch, usage.endpoint_url) == ("usage", 20, "http://127.0.0.1:4566")
    assert sync.queue_url.endswith("/billing-to-posthog-us")
    assert sync.handler == "billing_sync"


def test_every_error_is_reported_with_its_path():
    errors = errors_of(
        """
        [daemon]
        drain_timeout = 25
        log_level = "loud"
        colour = "blue"
        [[sources]]
        name = "a"
        type = "amqp"
        handler = "sms_dlr"
        exchange = "x"
        queue = "q"
        prefetch = 0
        [[sources]]
        name = "b"
        type = "kafka"
        """
    )
    assert errors == [
        "daemon.colour: unknown key (known keys: drain_timeout, log_format, log_level, uvloop)",
        'daemon.drain_timeout: expected a duration such as "500ms", "30s" or "5m", got 25',
        'daemon.log_level: expected one of debug | info | warning | error, got "loud"',
        "sources[0].prefetch: expected int >= 1, got 0",
        'sources[1].type: expected one of "sqs" | "amqp", got "kafka"',
    ]


def test_rules_across_keys():
    errors = errors_of(
        """
        [supervisor]
        backoff_initial = "1m"
        backoff_max = "30s"
        [[sources]]
        name = "a"
        type = "amqp"
        handler = "sms_dlr"
        exchange = "x"
        queue = "q"
        [[sources]]
        name = "a"
        type = "amqp"
        handler = "sms_dlr"
        exchange = "x"
        queue = "q2"
        retry_initial = "10s"
        retry_max = "1s"
        """
    )
    assert "supervisor.backoff_initial: must not exceed backoff_max (60s > 30s)" in errors
    assert "sources[1].name: 'a' is already the name of sources[0]" in errors
    assert "sources[1].retry_initial: must not exceed retry_max (10s > 1s)" in errors


def test_env_expansion_required_and_default():
    text = (
        """
    [redis]
    url = "${REDIS_URL}"
    [http]
    listen = "${LISTEN:-127.0.0.1:9999}"
    """
        + A_SOURCE
    )
    assert errors_of(text) == [
        "redis.url: environment variable REDIS_URL is not set "
        "(set it, or write ${REDIS_URL:-default} to allow a default)"
    ]
    settings = parse_config(text, {"REDIS_URL": "redis://db:6379/2"})
    assert settings.redis.url == "redis://db:6379/2"
    assert settings.http.port == 9999
    assert parse_config(text, {"REDIS_URL": "x", "LISTEN": "0.0.0.0:1"}).http.listen == "0.0.0.0:1"


def test_secrets_must_not_be_written_in_the_file():
    errors = errors_of('[stripe]\napi_key = "sk_live_abc"\n' + A_SOURCE)
    assert errors == [
        'stripe.api_key: a secret must not be written in the file: write "${STRIPE_SECRET_KEY}" '
        '(and set STRIPE_SECRET_KEY), "${file:/run/secrets/…}" or "${credential:NAME}"'
    ]
    assert parse_config('[stripe]\napi_key = "${K}"\n' + A_SOURCE, {"K": "sk_test"}).stripe.api_key == "sk_test"


def test_secrets_from_files_and_systemd_credentials(tmp_path):
    """`${file:/path}` (a mounted Kubernetes or Docker secret) and `${credential:NAME}` (systemd's
    `LoadCredential=`): the contents, one trailing newline dropped, allowed for secret keys."""
    (tmp_path / "stripe").write_text("sk_test_from_file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis").write_bytes(b"p@ss w$rd\r\n")
    text = (
        f'[stripe]\napi_key = "${{file:{tmp_path}/stripe}}"\n[redis]\npassword = "${{credential:redis}}"\n' + A_SOURCE
    )
    settings = parse_config(text, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert settings.stripe.api_key == "sk_test_from_file"
    assert settings.redis.password == "p@ss w$rd"


@pytest.mark.parametrize(
    ("reference", "environ", "error"),
    [
        ("${file:/nonexistent/stripe}", {}, "cannot read the secret /nonexistent/stripe: No such file or directory "
         "(mount the secret there, or fix the path)"),
        ("${file:relative/stripe}", {}, "${file:relative/stripe} must name an absolute path (/run/secrets/…)"),
        ("${credential:stripe}", {}, "${credential:stripe} needs systemd's CREDENTIALS_DIRECTORY, which is not set "
         "(add LoadCredential=stripe:/path/to/secret to the unit, or use ${file:…})"),
        ("${credential:../etc/passwd}", {"CREDENTIALS_DIRECTORY": "/tmp"}, "${credential:../etc/passwd}: not a "
         "credential name"),
    ],
)  # fmt: skip
def test_an_unreadable_secret_is_a_config_error_naming_the_key(reference, environ, error):
    assert errors_of(f'[stripe]\napi_key = "{reference}"\n' + A_SOURCE, environ) == [f"stripe.api_key: {error}"]


def test_a_secret_file_that_is_not_a_secret_is_refused(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * (64 * 1024 + 1))
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    assert errors_of(f'[stripe]\napi_key = "${{file:{tmp_path}/big}}"\n' + A_SOURCE) == [
        f"stripe.api_key: cannot read the secret {tmp_path}/big: larger than 64 KiB: not a secret "
        "(mount the secret there, or fix the path)"
    ]
    assert "not UTF-8 text" in errors_of(f'[stripe]\napi_key = "${{file:{tmp_path}/binary}}"\n' + A_SOURCE)[0]


@pytest.mark.parametrize("text", ["", '[daemon]\nlog_level = "info"\n', "sources = []\n"])
def test_a_file_without_sources_is_refused(text):
    # an empty or truncated file must neither start a daemon that bills nothing nor, on SIGHUP,
    # drain every source
    assert errors_of(text) == [
        "sources: no [[sources]] table: billingd would consume nothing; add at least one [[sources]]"
    ]


def test_not_toml_and_missing_file(tmp_path):
    assert errors_of("[daemon\n")[0].startswith("not valid TOML")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml")
    assert caught.value.errors[0].startswith("cannot read the file")


@given(st.integers(min_value=0, max_value=10**7))
def test_duration_round_trip(milliseconds):
    seconds = milliseconds / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 days", "-1s", "1.s", "ms"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


def test_sqs_source_rules():
    errors = errors_of(A_SOURCE + 'wait_time = "30s"\nvisibility_timeout = "13h"\nack_flush = "1s"\n')
    assert errors == [
        "sources[0].ack_flush: expected at most 100ms, got 1000ms",
        "sources[0].wait_time: expected at most 20s (the SQS long-poll limit), got 30s",
        "sources[0].visibility_timeout: expected between 1s and 12h, got 46800s",
    ]


def test_meters_equal_but_for_case_are_refused():
    from billingd.config import ConfigError, parse_config

    text = '[stripe]\nmeters = { ai_credits = "a", AI_CREDITS = "b" }\n' + A_SOURCE
    with pytest.raises(ConfigError) as refused:
        parse_config(text, {})
    assert any(
        'stripe.meters."AI_CREDITS": matches the same event types as "ai_credits"' in e for e in refused.value.errors
    )


def test_uvloop_is_the_default_loop_and_can_be_switched_off():
    from billingd.daemon.loop import loop_options

    assert parse_config(A_SOURCE, {}).daemon.uvloop is True
    off = parse_config("[daemon]\nuvloop = false\n" + A_SOURCE, {})
    assert loop_options(True) == {"use_uvloop": True}  # uvloop is a dependency on Linux
    assert loop_options(off.daemon.uvloop) == {}


def test_sqs_client_is_lean_by_default_and_a_wrong_one_is_named():
    assert parse_config(A_SOURCE, {}).source("u").sqs_client == "lean"
    assert parse_config(A_SOURCE + 'sqs_client = "botocore"\n', {}).source("u").sqs_client == "botocore"
    (error,) = errors_of(A_SOURCE + 'sqs_client = "fast"\n')
    assert "sqs_client" in error and "lean" in error and "botocore" in error
