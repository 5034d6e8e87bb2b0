"""Load and validate `billingd.toml`: every error is collected with its TOML path.

msgspec stops at the first error; operators want all of them at once (`billingd check`), so the
tree is first walked field by field against the Struct types, then decoded in one go.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from billingd.config.durations import Duration
from billingd.config.env import expand_tree
from billingd.config.model import (
    SQS_MAX_VISIBILITY,
    SQS_MAX_WAIT,
    AmqpSourceSettings,
    Settings,
    SqsSourceSettings,
    TlsSettings,
)
from billingd.config.tls import TlsFileError, client_context
from billingd.telemetry.redact import scrub

T = TypeVar("T")

#: Keys whose values are secrets → the variable DESIGN §4 reads them from. A secret must come
#: from the environment (`${VAR}`), a file (`${file:/run/secrets/…}`) or a systemd credential
#: (`${credential:NAME}`), never be written in the file.
SECRET_KEYS = {
    "stripe.api_key": "STRIPE_SECRET_KEY",
    "stripe.webhook_secret": "STRIPE_WEBHOOK_SECRET",
    "razorpay.key_secret": "RAZORPAY_KEY_SECRET",
    "razorpay.webhook_secret": "RAZORPAY_WEBHOOK_SECRET",
    "redis.password": "REDIS_PASSWORD",
}


class ConfigError(Exception):
    """An invalid configuration. `errors` holds one `"path: message"` line per problem."""

    def __init__(self, errors: list[str], path: str | None = None) -> None:
        self.errors = [scrub(e) for e in errors]  # a value echoed back may be a URL with its password
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{len(errors)} configuration error(s):\n  " + "\n  ".join(errors))


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Read, expand and validate the TOML file at `path`.

    Raises:
        ConfigError: the file is missing, not TOML, or invalid; `errors` lists every problem.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], str(path)) from exc
    try:
        return parse_config(text, environ)
    except ConfigError as exc:
        raise ConfigError(exc.errors, str(path)) from None


def parse_config(text: str, environ: Mapping[str, str] | None = None) -> Settings:
    """Validate TOML `text` (see `load_config`). `environ` defaults to `os.environ`.

    Raises:
        ConfigError: with every error found.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"]) from None
    tree, expansion = expand_tree(raw, os.environ if environ is None else environ)
    errors = list(expansion.errors)
    errors += _secrets_from_env(raw, expansion.from_env)
    _walk(tree, Settings, "", errors)
    if errors:
        raise ConfigError(errors)
    settings = msgspec.convert(_resolve_tls_names(tree), Settings, strict=False, dec_hook=_dec_hook)
    errors += semantic_errors(settings)
    if errors:
        raise ConfigError(errors)
    return settings


def semantic_errors(settings: Settings) -> list[str]:
    """Rules that span several keys (ordering of durations, unique names, at least one source)."""
    errors: list[str] = []
    if not settings.sources:
        # An empty or truncated file (a ConfigMap that did not mount, an editor caught mid-write
        # by SIGHUP) must not start a daemon that bills nothing, nor drain every running source.
        errors.append("sources: no [[sources]] table: billingd would consume nothing; add at least one [[sources]]")

    def order(path: str, low_key: str, low: float, high_key: str, high: float) -> None:
        if low > high:
            errors.append(f"{path}.{low_key}: must not exceed {high_key} ({low:g}s > {high:g}s)")

    sup = settings.supervisor
    order("supervisor", "backoff_initial", sup.backoff_initial, "backoff_max", sup.backoff_max)
    if settings.redis.cluster and settings.redis.sentinels:
        errors.append("redis.sentinels: a Redis Cluster has no sentinels: set cluster = true or sentinels, not both")
    if settings.redis.cluster:
        database = settings.redis.url.split("://", 1)[-1].partition("/")[2].split("?")[0]
        if database not in ("", "0"):
            errors.append(f"redis.url: a Redis Cluster has only database 0, got /{database}: drop it from the URL")
    folded: dict[str, str] = {}
    for name in settings.stripe.meters:  # matched case-insensitively (billingd.handlers.usage.meters)
        if name.casefold() in folded:
            errors.append(
                f'stripe.meters."{name}": matches the same event types as "{folded[name.casefold()]}" '
                "(event types are matched case-insensitively): keep one"
            )
        folded.setdefault(name.casefold(), name)
    for name in settings.breakers:
        resolved = settings.breaker(name)
        order(
            f'breakers."{name}"',
            "reset_timeout",
            resolved.reset_timeout,
            "reset_timeout_max",
            resolved.reset_timeout_max,
        )
    errors += _tls_errors(settings)
    seen: dict[str, int] = {}
    for i, source in enumerate(settings.sources):
        path = f"sources[{i}]"
        if source.name in seen:
            errors.append(f"{path}.name: {source.name!r} is already the name of sources[{seen[source.name]}]")
        seen.setdefault(source.name, i)
        order(path, "retry_initial", source.retry_initial, "retry_max", source.retry_max)
        if source.ack_flush > 0.1:
            errors.append(f"{path}.ack_flush: expected at most 100ms, got {source.ack_flush * 1000:g}ms")
        if isinstance(source, SqsSourceSettings):
            if source.wait_time > SQS_MAX_WAIT:
                errors.append(
                    f"{path}.wait_time: expected at most {SQS_MAX_WAIT}s (the SQS long-poll limit), "
                    f"got {source.wait_time:g}s"
                )
            if not 1 <= source.visibility_timeout <= SQS_MAX_VISIBILITY:
                errors.append(
                    f"{path}.visibility_timeout: expected between 1s and 12h, got {source.visibility_timeout:g}s"
                )
        else:
            errors += _amqp_errors(source, path)
    return errors


def _tls_errors(settings: Settings) -> list[str]:
    """Each `tls` key names a table, goes with a TLS URL, and its files make a context."""
    errors: list[str] = []
    checked: set[str] = set()

    def usable(path: str, choice: TlsSettings | str | None, schemes: set[str], tls_scheme: str) -> None:
        if isinstance(choice, str) and choice not in settings.tls:
            known = ", ".join(sorted(settings.tls)) or "none"
            errors.append(f"{path}.tls: no [tls.{choice}] table (known: {known}): add it, or write the keys inline")
            return
        if len(schemes) > 1:
            errors.append(f"{path}.url: mixes {' and '.join(sorted(schemes))} nodes: use {tls_scheme}:// for all")
        elif choice is not None and tls_scheme not in schemes:
            errors.append(f"{path}.tls: the URL is not {tls_scheme}://: write {tls_scheme}:// to connect over TLS")
        if choice is None or (isinstance(choice, str) and choice in checked):
            return
        where = f"tls.{choice}" if isinstance(choice, str) else f"{path}.tls"
        if isinstance(choice, str):
            checked.add(choice)
        try:
            client_context(settings.tls_of(choice) or TlsSettings())
        except TlsFileError as exc:
            errors.append(f"{where}.{exc}")

    redis = settings.redis
    usable("redis", redis.tls, {_scheme(redis.url)}, "rediss")
    for i, source in enumerate(settings.sources):
        if isinstance(source, SqsSourceSettings):
            if source.tls is not None:
                errors.append(
                    f"sources[{i}].tls: SQS is reached over HTTPS with AWS's certificates: for a proxy's CA, "
                    "set AWS_CA_BUNDLE"
                )
            continue
        usable(f"sources[{i}]", source.tls, {_scheme(u) for u in source.urls}, "amqps")
    return errors


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _amqp_errors(source: AmqpSourceSettings, path: str) -> list[str]:
    """An AMQP source's queue type, as `queue_type` and `queue_arguments` may both give it."""
    declared = source.queue_arguments.get("x-queue-type")
    if declared is not None and declared not in ("classic", "quorum"):
        return [
            f'{path}.queue_arguments."x-queue-type": expected "classic" or "quorum", got {declared!r} '
            "(a stream is not a work queue: billingd cannot ack its messages one by one)"
        ]
    if declared is not None and source.queue_type is not None and declared != source.queue_type:
        return [
            f'{path}.queue_type: {source.queue_type!r} but queue_arguments."x-queue-type" is {declared!r}: '
            "keep one of them"
        ]
    return []


def _secrets_from_env(raw: dict[str, Any], from_env: set[str]) -> list[str]:
    errors = []
    for key, var in SECRET_KEYS.items():
        section, name = key.split(".")
        table = raw.get(section)
        value = table.get(name) if isinstance(table, dict) else None
        if isinstance(value, str) and value and key not in from_env:
            errors.append(
                f'{key}: a secret must not be written in the file: write "${{{var}}}" (and set {var}), '
                f'"${{file:/run/secrets/…}}" or "${{credential:NAME}}"'
            )
    return errors


def check_value(value: Any, typ: Any, path: str) -> list[str]:
    """Every problem of `value` against type `typ` (a Struct, a container of Structs, or a leaf
    type), as `"path: message"` lines. Used for tables validated outside `Settings`, such as a
    source's `handler_options`."""
    errors: list[str] = []
    _walk(value, typ, path, errors)
    return errors


def convert(value: Any, typ: type[T]) -> T:
    """Decode an already-checked `value` into `typ` with the config's rules (durations, lax
    scalars; for `Settings`, `tls` names resolved). Raises msgspec.ValidationError when
    `check_value` would have reported errors."""
    if typ is Settings:
        value = _resolve_tls_names(value)
    return msgspec.convert(value, typ, strict=False, dec_hook=_dec_hook)


def _resolve_tls_names(tree: Any) -> Any:
    """A copy of `tree` where every `tls = "<name>"` of `[redis]` and `[[sources]]` is replaced
    by the `[tls.<name>]` table (an unknown name stays, for `semantic_errors` to report): what
    runs sees only tables, and a change of a shared table restarts what uses it."""
    if not isinstance(tree, dict):
        return tree
    found = tree.get("tls")
    tables: dict[str, Any] = found if isinstance(found, dict) else {}

    def resolved(section: Any) -> Any:
        if isinstance(section, dict) and isinstance(section.get("tls"), str) and section["tls"] in tables:
            return {**section, "tls": tables[section["tls"]]}
        return section

    out = {**tree, "redis": resolved(tree.get("redis"))} if "redis" in tree else dict(tree)
    if isinstance(tree.get("sources"), list):
        out["sources"] = [resolved(s) for s in tree["sources"]]
    return out


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Duration:
        if isinstance(obj, str):
            return Duration(obj)
        raise ValueError(f'expected a duration such as "500ms", "30s" or "5m", got {_show(obj)}')
    raise NotImplementedError(f"no decoder for {typ!r}")


def _walk(value: Any, typ: Any, path: str, errors: list[str]) -> None:
    """Check `value` against `typ`, appending `"path: message"` for every problem found."""
    struct = _struct_choice(value, typ, path, errors)
    if struct is _INVALID:
        return
    if struct is not None:
        _walk_struct(value, struct, path, errors)
        return
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is list and _has_struct(args[0]):
        if not isinstance(value, list):
            errors.append(f"{path}: expected an array of tables, got {_show(value)}")
            return
        for i, item in enumerate(value):
            _walk(item, args[0], f"{path}[{i}]", errors)
        return
    if origin is dict and _has_struct(args[1]):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a table, got {_show(value)}")
            return
        for key, item in value.items():
            key_path = f'{path}."{key}"'
            _leaf(key, args[0], key_path, errors)
            _walk(item, args[1], key_path, errors)
        return
    _leaf(value, typ, path, errors)


_INVALID = object()


def _struct_choice(value: Any, typ: Any, path: str, errors: list[str]) -> Any:
    """The Struct type `value` should be checked as, None for a non-Struct type, `_INVALID` on error."""
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        return typ
    members = [a for a in typing.get_args(typ) if isinstance(a, type) and issubclass(a, msgspec.Struct)]
    if not members or typing.get_origin(typ) not in (typing.Union, types.UnionType):
        return None
    if not isinstance(value, dict) and len(members) < len([a for a in typing.get_args(typ) if a is not type(None)]):
        return None  # a union of a table and a scalar (`tls = "name"`): the scalar is checked as a leaf
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a table, got {_show(value)}")
        return _INVALID
    infos = {m.__struct_config__.tag: m for m in members}
    tag_field = members[0].__struct_config__.tag_field
    tag = value.get(tag_field)
    if tag not in infos:
        choices = " | ".join(f'"{t}"' for t in infos)
        got = "nothing" if tag is None else _show(tag)
        errors.append(f"{path}.{tag_field}: expected one of {choices}, got {got}")
        return _INVALID
    return infos[tag]


def _walk_struct(value: Any, struct: type[msgspec.Struct], path: str, errors: list[str]) -> None:
    if not isinstance(value, dict):
        errors.append(f"{path or 'the file'}: expected a table, got {_show(value)}")
        return
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    tag_field = struct.__struct_config__.tag_field
    prefix = f"{path}." if path else ""
    for key in value:
        if key not in fields and key != tag_field:
            known = ", ".join(sorted(fields))
            errors.append(f"{prefix}{key}: unknown key (known keys: {known})")
    for key, f in fields.items():
        if key in value:
            _walk(value[key], f.type, f"{prefix}{key}", errors)
        elif f.required:
            errors.append(f"{prefix}{key}: required key is missing")


def _leaf(value: Any, typ: Any, path: str, errors: list[str]) -> None:
    try:
        msgspec.convert(value, typ, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        errors.append(f"{path}: {_explain(exc, value, typ)}")


def _explain(exc: msgspec.ValidationError, value: Any, typ: Any) -> str:
    message = str(exc).split(" - at `", 1)[0]
    description = _description(typ)
    literals = _literals(typ)
    if description:
        return f"expected {description}, got {_show(value)}"
    if literals:
        return f"expected one of {' | '.join(map(str, literals))}, got {_show(value)}"
    message = message.replace("`", "")
    message = message[0].lower() + message[1:]
    if ", got " in message:
        message = message.split(", got ", 1)[0]
    if message.startswith("expected"):
        return f"{message}, got {_show(value)}"
    return message


def _description(typ: Any) -> str | None:
    for candidate in (typ, *typing.get_args(typ)):
        for meta in getattr(candidate, "__metadata__", ()):
            if isinstance(meta, msgspec.Meta) and meta.description:
                return meta.description
    return None


def _literals(typ: Any) -> tuple[Any, ...]:
    if typing.get_origin(typ) is typing.Literal:
        return typing.get_args(typ)
    return ()


def _has_struct(typ: Any) -> bool:
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        return True
    return any(_has_struct(a) for a in typing.get_args(typ))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)
