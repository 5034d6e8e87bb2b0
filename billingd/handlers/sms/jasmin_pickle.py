"""Reading Jasmin's pickles without running them: a restricted unpickler over an allow-list.

Jasmin (0.11.1) pickles two things billingd needs (seed 002, "Pickle Support"; DESIGN §8):

* the `submit_sm_bill` header of `submit.sm.<cid>` messages, a `jasmin.routing.Bills.SubmitSmBill`
  holding the user (uid) and the amounts of one submission (`submit_sm`: the early share Jasmin
  charges at submit time; `submit_sm_resp`: the rest, billed on `ESME_ROK`);
* the body of the same message, an `smpp.pdu.operations.SubmitSM` whose `nextPdu` chain says how
  many parts a long message has (Jasmin charges the early share once per part).

A pickle is a program: `pickle.loads` would import and call whatever it names. `read_pickle` uses
`pickle.Unpickler` with `find_class` overridden (the "Restricting Globals" recipe of the Python
documentation): every global a pickle names must be in `ALLOWED`, where it maps onto a plain
stand-in — an attribute bag, a tagged enum value, `set`, a Latin-1 encoder, a regex *pattern
string* (never compiled). Nothing of Jasmin's, smpp.pdu's or `re`'s is imported and nothing else
is ever called; a pickle naming any other global raises `PickleRefused` with that name, which
the handler dead-letters. Before anything is unpickled, the opcode stream is parsed (not run):
persistent ids, extension codes and memo indexes large enough to make the unpickler allocate
gigabytes are refused.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections.abc import Callable
from typing import Any

#: Largest pickle read (bytes): a submit_sm_bill header is ~1.5 KB, a 3-part SubmitSM ~2 KB.
MAX_PICKLE = 256 * 1024
#: Largest memo index a pickle may use: `LONG_BINPUT 0x7fffffff` would make the unpickler grow its
#: memo to billions of slots (gigabytes) from a 10-byte pickle.
MAX_MEMO = 100_000
#: Opcodes that reach outside the pickle (persistent ids, the copyreg extension registry).
_REFUSED_OPCODES = frozenset({"PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4"})
_MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


class PickleRefused(ValueError):
    """The pickle names a global outside `ALLOWED`, or is not a readable pickle."""


class Obj:
    """A stand-in instance: the pickled `__dict__` (or NEWOBJ arguments) as attributes.

    `kind` is the class the pickle named (`jasmin.routing.Bills.SubmitSmBill`)."""

    kind = "object"

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})

    def get(self, name: str, default: Any = None) -> Any:
        """An attribute the pickle set, or `default`."""
        return self.__dict__.get(name, default)


class EnumValue:
    """A stand-in for an smpp.pdu enum member such as `CommandStatus(1)`."""

    def __init__(self, kind: str, value: Any) -> None:
        self.kind, self.value = kind, value

    def __repr__(self) -> str:
        return f"{self.kind}({self.value!r})"


def _stand_in(kind: str) -> type[Obj]:
    return type(kind.rsplit(".", 1)[1], (Obj,), {"kind": kind, "__slots__": ()})


def _enum(kind: str) -> Callable[..., EnumValue]:
    def make(value: Any = None) -> EnumValue:
        return EnumValue(kind, value)

    return make


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """What `_codecs.encode(text, "latin1")` does for pickles of Python 2 byte strings."""
    if encoding.replace("-", "").lower() not in ("latin1", "iso88591"):
        raise PickleRefused(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return str(text).encode("latin-1")


def _bytes(*args: Any) -> bytes:
    """`bytes()` in a protocol-2 pickle (an empty byte string), or bytes of a short list of ints;
    never `bytes(n)`, which would allocate n bytes."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], list | tuple) and len(args[0]) <= MAX_PICKLE:
        return bytes(args[0])
    raise PickleRefused("bytes() with arguments other than a list of ints is not allowed")


def _pattern(pattern: Any, flags: Any = 0) -> str:
    """`re._compile` in a pickle (Jasmin's value filters): the pattern, never compiled."""
    return pattern.decode("latin-1") if isinstance(pattern, bytes) else str(pattern)


_JASMIN = (
    "jasmin.routing.Bills.SubmitSmBill",
    *(
        f"jasmin.routing.jasminApi.{name}"
        for name in ("User", "Group", "MtMessagingCredential", "SmppsCredential", "CredentialGenerick")
    ),
)
_SMPP_OBJECTS = (
    "smpp.pdu.operations.SubmitSM",
    "smpp.pdu.operations.SubmitSMResp",
    "smpp.pdu.pdu_types.EsmClass",
    "smpp.pdu.pdu_types.RegisteredDelivery",
    "smpp.pdu.pdu_types.DataCoding",
)
_SMPP_ENUMS = tuple(
    f"smpp.pdu.pdu_types.{name}"
    for name in (
        "CommandId",
        "CommandStatus",
        "AddrTon",
        "AddrNpi",
        "EsmClassMode",
        "EsmClassType",
        "EsmClassGsmFeatures",
        "PriorityFlag",
        "RegisteredDeliveryReceipt",
        "RegisteredDeliverySmeOriginatedAcks",
        "ReplaceIfPresentFlag",
        "MoreMessagesToSend",
        "DataCodingScheme",
        "DataCodingDefault",
    )
)

#: Every global a Jasmin pickle may name → its stand-in. The list is the union of what the
#: captured 0.11.1 traffic names (`tests/fixtures/jasmin-0.11.1`, `pickle.globals`).
ALLOWED: dict[str, Any] = {
    **{name: _stand_in(name) for name in _JASMIN + _SMPP_OBJECTS},
    **{name: _enum(name) for name in _SMPP_ENUMS},
    "_codecs.encode": _latin1,
    "re._compile": _pattern,
    "builtins.set": set,
    "__builtin__.set": set,
    "builtins.bytes": _bytes,
    "__builtin__.bytes": _bytes,
    "builtins.frozenset": frozenset,
}


def _check_opcodes(data: bytes) -> None:
    """Read the opcode stream without running it (`pickletools.genops` only parses): refuse memo
    indexes past `MAX_MEMO` and opcodes that reach outside the pickle."""
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in _REFUSED_OPCODES:
                raise PickleRefused(f"pickle uses {opcode.name}, which is not allowed")
            if opcode.name in _MEMO_OPCODES and isinstance(arg, int) and not 0 <= arg <= MAX_MEMO:
                raise PickleRefused(f"pickle uses memo slot {arg} (more than {MAX_MEMO})")
    except PickleRefused:
        raise
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as exc:
        raise PickleRefused(f"not a readable pickle: {exc}"[:300]) from None


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        target = ALLOWED.get(f"{module}.{name}")
        if target is None:
            raise PickleRefused(f"pickle names {module}.{name}, which is not on billingd's allow-list")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise PickleRefused("pickle uses a persistent id")


def read_pickle(data: bytes) -> Any:
    """The object a Jasmin pickle describes, built from stand-ins only (see module docstring).

    Raises:
        PickleRefused: a global outside `ALLOWED`, a persistent id, a pickle over `MAX_PICKLE`
            bytes, or data that is not a pickle (truncated, corrupt, nested too deeply).
    """
    if len(data) > MAX_PICKLE:
        raise PickleRefused(f"pickle of {len(data)} bytes is larger than {MAX_PICKLE}")
    _check_opcodes(data)
    try:
        return _Unpickler(io.BytesIO(data), fix_imports=True, encoding="latin1").load()
    except PickleRefused:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RecursionError,
        MemoryError,
        OverflowError,
    ) as exc:
        raise PickleRefused(f"not a readable pickle: {type(exc).__name__}: {exc}"[:300]) from None
