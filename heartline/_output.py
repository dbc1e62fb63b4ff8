"""A task's captured output as text: the tail of a stream, cut to a limit, marked when cut.

The agent reads the last bytes of each of a task's output files (``endpoint/_capture.py``)
and decodes them here; the server cuts again whatever it receives over its limit, as it
trusts no agent. Both keep the end of a stream, where a failing task says why.
"""

from __future__ import annotations

MARKER_ROOM = 64
"""Bytes a cut marker may add to a tail of the limit's size (a marker is well under this)."""


def cut_marker(cut: int) -> str:
    """The line that starts a tail of which ``cut`` bytes were dropped."""
    return f"[... {cut} bytes cut ...]\n"


def tail_text(data: bytes, cut: int = 0) -> str:
    """The text of the last bytes of a stream.

    Args:
        data: The stream's last bytes.
        cut: How many bytes came before ``data`` and are not in it.

    Returns:
        ``data`` decoded as UTF-8 (an undecodable byte becomes U+FFFD); after a cut, the
        rest of a character the cut fell inside is dropped too, and the text starts with
        ``cut_marker`` of everything dropped.
    """
    if not cut:
        return data.decode("utf-8", "replace")
    # A cut inside a character leaves up to 3 of its continuation bytes (10xxxxxx) at the
    # front: they are no character of their own.
    skip = 0
    while skip < 3 and skip < len(data) and data[skip] & 0xC0 == 0x80:
        skip += 1
    return cut_marker(cut + skip) + data[skip:].decode("utf-8", "replace")


def clip_output(text: str, limit: int) -> str:
    """``text`` as kept under a limit of ``limit`` bytes: whole if it fits (a cut marker
    of its own may add ``MARKER_ROOM`` bytes), else its tail; "" when ``limit`` is 0."""
    if not limit:
        return ""
    room = limit + MARKER_ROOM
    if len(text) * 4 <= room:  # at most 4 bytes a character: fits without encoding it
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= room:
        return text
    cut = len(data) - limit
    return tail_text(data[cut:], cut)
