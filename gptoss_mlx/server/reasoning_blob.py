"""`reasoning.encrypted_content`: the chain of thought, carried by stateless clients.

Codex (and any client with `store: false`) asks for `include: ["reasoning.encrypted_content"]`,
keeps the reasoning items it is given and sends them back with the next request. OpenAI encrypts
that field so the raw reasoning stays on its side; here the client runs the model itself, so there
is nothing to hide from it. What matters is that the reasoning comes back exactly, without server
memory (a restart or a full response store must not lose a tool loop's chain of thought), so the
field holds the text itself:

    "gptoss-mlx:v1:" + base64url(zlib(UTF-8 text))

The prefix marks it as ours and versions the encoding; anything else is refused with a 400 naming
the field rather than dropped (a client that switched servers mid-conversation learns why).
It is not encryption and not a signature: a client can edit it, as it can edit any message it
sends back.
"""

from __future__ import annotations

import base64
import binascii
import zlib

from ..errors import UsageError

PREFIX = "gptoss-mlx:v1:"
_MAX_TEXT_BYTES = 16 * 1024 * 1024  # bounds the zlib expansion of a hostile blob


def encode_reasoning(text: str) -> str:
    """The `encrypted_content` of a reasoning item whose chain of thought is `text`."""
    packed = zlib.compress(text.encode("utf-8"), 6)
    return PREFIX + base64.urlsafe_b64encode(packed).decode("ascii")


def decode_reasoning(blob: str, where: str) -> str:
    """The chain of thought in an `encrypted_content` made by `encode_reasoning`; UsageError
    naming `where` (e.g. "input[3].encrypted_content") for anything else."""
    if not isinstance(blob, str) or not blob.startswith(PREFIX):
        raise UsageError(
            f"{where}: not reasoning produced by this server (expected {PREFIX}...); drop the "
            "reasoning item or send its text in `content`"
        )
    try:
        packed = base64.urlsafe_b64decode(blob[len(PREFIX) :].encode("ascii"))
        d = zlib.decompressobj()
        raw = d.decompress(packed, _MAX_TEXT_BYTES)
        if d.unconsumed_tail or not d.eof:
            raise ValueError("truncated or too large")
        return raw.decode("utf-8")
    except (ValueError, binascii.Error, zlib.error, UnicodeError) as e:
        raise UsageError(f"{where}: corrupt reasoning content ({e})") from None
