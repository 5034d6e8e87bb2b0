"""Lua scripts, and one script applying a batch of calls of another (the batched-effects path).

`batched(script)` wraps `script`'s body in a Lua function and loops over the calls packed by
`pack`: one EVALSHA applies twenty messages' effects, instead of twenty EVALSHAs in a pipeline,
which halves the client's CPU per effect (redis-py packs and parses one command, Redis runs one
script call; `bench/compare.py` has the figures). Each call is run under `pcall`: a call that
raises gets its own error reply in the result array and the calls after it still run, so one
message's failure stays that message's (DESIGN §8). Every call still declares its keys in KEYS,
and callers only batch calls whose keys share a Redis Cluster slot.

Layout of a batched call: `KEYS` = every call's keys, in order; `ARGV` = `n`, then per call its
key count, its argument count and its arguments. The reply is an array of `n` replies (a call
that returned nil gives nil; one that raised gives an error reply, which redis-py hands back as a
`ResponseError` instance in the list).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1 (for EVALSHA)."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        """The script `source` with its digest computed."""
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


_BATCH = """local function one(KEYS, ARGV)
{body}
end
local out, ki, ai = {{}}, 1, 2
for i = 1, tonumber(ARGV[1]) do
  local nk, na = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
  ai = ai + 2
  local keys, argv = {{}}, {{}}
  for j = 1, nk do keys[j] = KEYS[ki + j - 1] end
  for j = 1, na do argv[j] = ARGV[ai + j - 1] end
  ki, ai = ki + nk, ai + na
  local ok, res = pcall(one, keys, argv)
  if not ok then
    local message = type(res) == 'table' and res.err or tostring(res)
    if not string.find(message, '^%u+ ') then message = 'ERR ' .. message end
    res = {{err = message}}
  elseif res == nil then
    res = false
  end
  out[i] = res
end
return out
"""


def batched(script: Script) -> Script:
    """The script that runs `script` once per packed call (see the module docstring)."""
    return Script.of(_BATCH.format(body=script.source))


def pack(calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> tuple[list[Any], list[Any]]:
    """`(keys, argv)` of a batched script for `calls`, each a `(keys, args)` pair."""
    keys: list[Any] = []
    argv: list[Any] = [len(calls)]
    for call_keys, call_args in calls:
        keys.extend(call_keys)
        argv += [len(call_keys), len(call_args), *call_args]
    return keys, argv
