"""Duration strings (`"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"15d"`) as float seconds."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


class Duration(float):
    """A duration in seconds, written in TOML as a string with a unit: `ms`, `s`, `m`, `h` or `d`.

    Raises:
        ValueError: the text is not a number followed by one of those units.
    """

    def __new__(cls, value: float | str) -> Duration:
        if isinstance(value, str):
            return super().__new__(cls, parse_duration(value))
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"Duration({float(self)!r})"


def parse_duration(text: str) -> float:
    """Parse `"500ms"` → 0.5, `"30s"` → 30.0, `"5m"` → 300.0 (seconds).

    Raises:
        ValueError: not a non-negative number followed by ms, s, m, h or d.
    """
    match = _PATTERN.match(text)
    if match is None:
        raise ValueError(f'expected a duration such as "500ms", "30s", "5m", "1h" or "7d", got {text!r}')
    return float(match.group(1)) * _UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest exact duration string for `seconds` (inverse of `parse_duration`)."""
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{int(seconds // 86400)}d"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    milliseconds = f"{seconds * 1000:.3f}".rstrip("0").rstrip(".")
    return f"{milliseconds}ms"
