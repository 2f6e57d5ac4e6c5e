"""Sans-IO decoding of compressed request bodies (``Content-Encoding``), bounded.

Claude Code gzips its messages body when it trusts cmm's CA through the system store, so the
model finder must read through the compression. Decoding is incremental and stops at a limit on
the decoded size: a decompression bomb costs at most that much memory, never an out-of-memory
worker. Input is fed in small slices so that no single call can expand far past the limit.
"""

from __future__ import annotations

import zlib
from typing import Callable

import brotli
import zstandard

from cmm.errors import HttpError

SUPPORTED = ("gzip", "x-gzip", "deflate", "br", "zstd")
_STEP = 16 * 1024  # output produced per decompress call (zlib, brotli)
_ZSTD_SLICE = 64  # input bytes per zstd call: zstd blocks can expand ~32000x


class _Stage:
    """One coding layer: feed compressed bytes, get decoded pieces; ``done`` says the stream ended."""

    def feed(self, data: bytes) -> list[bytes]:  # pragma: no cover - interface
        raise NotImplementedError

    def done(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class _Zlib(_Stage):
    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._object = zlib.decompressobj(31 if coding in ("gzip", "x-gzip") else 15)
        self._first = True

    def feed(self, data: bytes) -> list[bytes]:
        if self._first and data and self._coding == "deflate" and (data[0] & 0x0F) != 8:
            self._object = zlib.decompressobj(-15)  # raw deflate, as some clients send "deflate"
        self._first = self._first and not data
        out = []
        while data:
            piece = self._object.decompress(data, _STEP)
            if piece:
                out.append(piece)
            data = self._object.unconsumed_tail
            if self._object.eof and self._object.unused_data:
                raise zlib.error("data after the end of the compressed stream")
        return out

    def done(self) -> bool:
        return self._object.eof


class _Brotli(_Stage):
    def __init__(self) -> None:
        self._object = brotli.Decompressor()

    def feed(self, data: bytes) -> list[bytes]:
        out = []
        for start in range(0, len(data), 4096):
            piece = self._object.process(data[start : start + 4096], output_buffer_limit=_STEP)
            while True:
                if piece:
                    out.append(piece)
                if self._object.can_accept_more_data():
                    break
                piece = self._object.process(b"", output_buffer_limit=_STEP)
        return out

    def done(self) -> bool:
        return self._object.is_finished()


class _Zstd(_Stage):
    def __init__(self) -> None:
        self._object = zstandard.ZstdDecompressor().decompressobj()

    def feed(self, data: bytes) -> list[bytes]:
        out = []
        for start in range(0, len(data), _ZSTD_SLICE):
            piece = self._object.decompress(data[start : start + _ZSTD_SLICE])
            if piece:
                out.append(piece)
        return out

    def done(self) -> bool:
        return self._object.eof


_STAGES: dict[str, Callable[[str], _Stage]] = {
    "gzip": _Zlib, "x-gzip": _Zlib, "deflate": _Zlib, "br": lambda c: _Brotli(), "zstd": lambda c: _Zstd(),
}


def unsupported(codings: list[str]) -> list[str]:
    return [c for c in codings if c not in SUPPORTED and c != "identity"]


class BodyDecoder:
    """Decodes a body sent with ``codings`` (as listed in Content-Encoding, applied in order)."""

    def __init__(self, codings: list[str], limit: int) -> None:
        if unsupported(codings):
            raise ValueError(f"unsupported content-coding {', '.join(unsupported(codings))}")
        names = [c for c in codings if c != "identity"]
        self.names = ", ".join(names)
        self._stages = [_STAGES[c](c) for c in reversed(names)]  # the last coding applied is undone first
        self._limit = limit
        self._produced = [0] * len(self._stages)
        self.decoded = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Decoded pieces for ``data``; HttpError 400 for corrupt data, 413 past the limit."""
        pieces = [data]
        try:
            for index, stage in enumerate(self._stages):
                pieces = [out for piece in pieces for out in stage.feed(piece)]
                self._produced[index] += sum(len(p) for p in pieces)
                if self._produced[index] > self._limit:  # every layer is bounded, so no chain can balloon
                    raise HttpError(413, f"Decoded request body exceeds the {self._limit}-byte limit")
        except (zlib.error, brotli.error, zstandard.ZstdError) as error:
            raise HttpError(400, f"Malformed {self.names} request body: {error}") from None
        self.decoded = self._produced[-1] if self._produced else self.decoded + len(data)
        return pieces

    def finish(self) -> None:
        """The compressed body ended: it must have been complete."""
        if not all(stage.done() for stage in self._stages):
            raise HttpError(400, f"Truncated {self.names} request body")
