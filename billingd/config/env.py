"""`${VAR}` and `${VAR:-default}` expansion over a parsed TOML tree.

`${VAR}` must be set (an unset variable is a config error naming the key); `${VAR:-default}`
takes the default when the variable is unset or empty, and the default may be empty. `$$` is a
literal `$`. Only string values are expanded; the tree's shape is unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Expansion:
    """The result of expanding a tree: the new tree, the errors, and which paths used the environment."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.from_env: set[str] = set()


def expand_tree(tree: Any, environ: Mapping[str, str], path: str = "") -> tuple[Any, Expansion]:
    """Return a copy of `tree` with every string's references expanded.

    Errors (unset `${VAR}`) are collected as `"path: message"` strings in the returned
    `Expansion`, never raised, so that `billingd check` can print all of them.
    """
    result = Expansion()
    return _expand(tree, environ, path, result), result


def _expand(node: Any, environ: Mapping[str, str], path: str, result: Expansion) -> Any:
    if isinstance(node, dict):
        return {k: _expand(v, environ, _join(path, k), result) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, environ, f"{path}[{i}]", result) for i, v in enumerate(node)]
    if isinstance(node, str) and "$" in node:
        return _expand_string(node, environ, path, result)
    return node


def _expand_string(text: str, environ: Mapping[str, str], path: str, result: Expansion) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        result.from_env.add(path)
        value = environ.get(name)
        if default is not None:
            return value if value else default
        if value is None:
            result.errors.append(
                f"{path}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-default}} to allow a default)"
            )
            return ""
        return value

    return _REFERENCE.sub(replace, text)


def _join(path: str, key: str) -> str:
    segment = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else f'"{key}"'
    return f"{path}.{segment}" if path else segment
