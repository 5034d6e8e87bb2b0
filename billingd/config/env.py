"""Reference expansion over a parsed TOML tree: the environment, secret files, systemd credentials.

* `${VAR}` — the environment variable `VAR`, which must be set (an unset variable is a config
  error naming the key); `${VAR:-default}` takes the default when the variable is unset or empty
  (the default may be empty);
* `${file:/absolute/path}` — the contents of a file (a Kubernetes secret mounted as a volume, a
  Docker secret under `/run/secrets`);
* `${credential:NAME}` — the systemd credential `NAME` (`LoadCredential=NAME:…` or
  `SetCredentialEncrypted=`): the file `NAME` in `$CREDENTIALS_DIRECTORY` (systemd.exec(5),
  "Credentials");
* `$$` — a literal `$`.

A file's or credential's one trailing newline (`\\n` or `\\r\\n`, as `echo` and most editors
leave) is dropped; nothing else is changed. A file must be at most `MAX_SECRET_BYTES` and UTF-8.
Only string values are expanded; the tree's shape is unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: The largest secret file read (bytes): a key, a password, a PEM bundle — never a data file.
MAX_SECRET_BYTES = 64 * 1024

_REFERENCE = re.compile(
    r"\$\$"
    r"|\$\{(?P<kind>file|credential):(?P<target>[^}]*)\}"
    r"|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"
)
_CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,255}$")


class Expansion:
    """The result of expanding a tree: the errors, and which paths used a reference (`from_env`:
    the environment, a file or a credential)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.from_env: set[str] = set()


def read_secret_file(path: str) -> str:
    """The text of the secret file at `path`, one trailing newline dropped.

    Raises:
        OSError: unreadable (missing, a directory, no permission).
        ValueError: larger than `MAX_SECRET_BYTES`, or not UTF-8.
    """
    with Path(path).open("rb") as handle:
        raw = handle.read(MAX_SECRET_BYTES + 1)
    if len(raw) > MAX_SECRET_BYTES:
        raise ValueError(f"larger than {MAX_SECRET_BYTES // 1024} KiB: not a secret")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    return text.removesuffix("\n").removesuffix("\r")


def expand_tree(
    tree: Any,
    environ: Mapping[str, str],
    path: str = "",
    read: Callable[[str], str] = read_secret_file,
) -> tuple[Any, Expansion]:
    """Return a copy of `tree` with every string's references expanded.

    Errors (an unset `${VAR}`, an unreadable file or credential) are collected as `"path: message"`
    strings in the returned `Expansion`, never raised, so that `billingd check` can print all of
    them. `read` reads a file (tests replace it).
    """
    result = Expansion()
    return _Expander(environ, read, result).node(tree, path), result


class _Expander:
    def __init__(self, environ: Mapping[str, str], read: Callable[[str], str], result: Expansion) -> None:
        self.environ = environ
        self.read = read
        self.result = result

    def node(self, node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {k: self.node(v, _join(path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [self.node(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str) and "$" in node:
            return _REFERENCE.sub(lambda match: self.replace(match, path), node)
        return node

    def replace(self, match: re.Match[str], path: str) -> str:
        if match.group(0) == "$$":
            return "$"
        self.result.from_env.add(path)
        if match.group("kind") is not None:
            return self.secret(match.group("kind"), match.group("target"), path)
        name, default = match.group("name"), match.group("default")
        value = self.environ.get(name)
        if default is not None:
            return value if value else default
        if value is None:
            self.result.errors.append(
                f"{path}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-default}} to allow a default)"
            )
            return ""
        return value

    def secret(self, kind: str, target: str, path: str) -> str:
        if kind == "file":
            if not os.path.isabs(target):
                self.result.errors.append(f"{path}: ${{file:{target}}} must name an absolute path (/run/secrets/…)")
                return ""
            where, fix = target, "mount the secret there, or fix the path"
        else:
            directory = self.environ.get("CREDENTIALS_DIRECTORY")
            if not _CREDENTIAL_NAME.match(target):
                self.result.errors.append(f"{path}: ${{credential:{target}}}: not a credential name")
                return ""
            if not directory:
                self.result.errors.append(
                    f"{path}: ${{credential:{target}}} needs systemd's CREDENTIALS_DIRECTORY, which is not set "
                    f"(add LoadCredential={target}:/path/to/secret to the unit, or use ${{file:…}})"
                )
                return ""
            where, fix = os.path.join(directory, target), f"add LoadCredential={target}:… to the unit"
        try:
            value = self.read(where)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.result.errors.append(f"{path}: cannot read the secret {where}: {reason} ({fix})")
            return ""
        return value


def _join(path: str, key: str) -> str:
    segment = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else f'"{key}"'
    return f"{path}.{segment}" if path else segment
