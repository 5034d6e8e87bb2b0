"""Body codecs named by a `content_encoding` (seed 000: gzip-compressed, then base64-encoded).

`content_encoding` lists encodings separated by `+`, `,` or spaces (`gzip`, `base64`,
`gzip+base64`, `identity`). Base64 is the outer layer: an SQS body must be text, so on a text
transport `gzip` alone implies base64 as well (seed 000's billing service sends exactly that).
A decompressed body is capped at `MAX_BODY` bytes so a gzip bomb cannot exhaust memory.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import re
import zlib

MAX_BODY = 16 * 1024 * 1024
KNOWN = frozenset({"gzip", "base64", "identity"})


class UndecodableBody(ValueError):
    """The body does not decode as its `content_encoding` says."""


def _tokens(encoding: str) -> set[str]:
    return {t for t in re.split(r"[\s,+]+", encoding.strip().lower()) if t}


def decode_body(raw: bytes, encoding: str | None, *, text_transport: bool) -> bytes:
    """Undo `encoding` on `raw`.

    Raises:
        UndecodableBody: an unknown encoding, invalid base64, corrupt gzip, or a body over
            `MAX_BODY` once decompressed.
    """
    if not encoding:
        return raw
    tokens = _tokens(encoding)
    unknown = tokens - KNOWN
    if unknown:
        raise UndecodableBody(f"unsupported content_encoding {encoding!r} (known: gzip, base64)")
    data = raw
    try:
        if "base64" in tokens or ("gzip" in tokens and text_transport):
            data = base64.b64decode(data, validate=True)
        if "gzip" in tokens:
            inflater = zlib.decompressobj(wbits=31)
            data = inflater.decompress(data, MAX_BODY + 1)
            if len(data) > MAX_BODY or inflater.unconsumed_tail:
                raise UndecodableBody(f"body larger than {MAX_BODY} bytes once decompressed")
            if not inflater.eof:
                raise UndecodableBody("gzip stream is truncated")
    except (binascii.Error, zlib.error, ValueError) as exc:
        if isinstance(exc, UndecodableBody):
            raise
        raise UndecodableBody(f"body does not decode as {encoding!r}: {exc}") from None
    return data


def encode_body(data: bytes, encoding: str | None, *, text_transport: bool) -> bytes:
    """Apply `encoding` to `data` (the inverse of `decode_body`; used by tools and tests)."""
    if not encoding:
        return data
    tokens = _tokens(encoding)
    if "gzip" in tokens:
        data = gzip.compress(data, mtime=0)
    if "base64" in tokens or ("gzip" in tokens and text_transport):
        data = base64.b64encode(data)
    return data
