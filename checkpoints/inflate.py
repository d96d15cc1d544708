"""Decompression with a bound on the output: a few KB of brotli or xz can inflate to gigabytes.

Every reader decompresses through these, with the size its container declares (model.bin) or a cap
derived from the architecture (``.ptz``), so a decompression bomb costs at most that bound.
"""

from __future__ import annotations

import lzma

import brotli

# Output is produced in steps of this size, so the limit is overshot by at most one step.
_STEP = 1 << 20


class InflateError(Exception):
    """Corrupt or truncated data, or more output than allowed; ``too_large`` tells which."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def _too_large(limit: int) -> InflateError:
    return InflateError(f"decompresses to more than {limit:,} bytes", too_large=True)


def brotli_decompress(data: bytes, limit: int) -> bytes:
    """The whole brotli stream, or InflateError once the output would pass ``limit`` bytes."""
    d = brotli.Decompressor()
    out = bytearray()
    try:
        chunk = d.process(data, output_buffer_limit=_STEP)
        while True:
            out += chunk
            if len(out) > limit:
                raise _too_large(limit)
            if d.is_finished():
                break
            chunk = d.process(b"", output_buffer_limit=_STEP)
            if not chunk:  # all input consumed, no more output: the stream is cut short
                break
    except brotli.error as exc:
        raise InflateError(f"brotli data is corrupt ({exc})") from None
    if not d.is_finished():
        raise InflateError("brotli data is truncated (the stream does not end)")
    return bytes(out)


def lzma_decompress(data: bytes, limit: int, *, fmt: int = lzma.FORMAT_XZ) -> bytes:
    """xz (or legacy ``.lzma`` with ``fmt=lzma.FORMAT_ALONE``), bounded like ``brotli_decompress``."""
    d = lzma.LZMADecompressor(format=fmt)
    out = bytearray()
    try:
        chunk = d.decompress(data, max_length=_STEP)
        while True:
            out += chunk
            if len(out) > limit:
                raise _too_large(limit)
            if d.eof or d.needs_input:
                break
            chunk = d.decompress(b"", max_length=_STEP)
    except lzma.LZMAError as exc:
        raise InflateError(f"{'xz' if fmt == lzma.FORMAT_XZ else 'lzma'} data is corrupt ({exc})") from None
    if not d.eof:
        raise InflateError(f"{'xz' if fmt == lzma.FORMAT_XZ else 'lzma'} data is truncated (the stream does not end)")
    if d.unused_data:
        raise InflateError(f"{len(d.unused_data)} bytes follow the end of the compressed stream")
    return bytes(out)
