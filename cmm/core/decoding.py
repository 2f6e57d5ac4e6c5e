"""Sans-IO decoding of compressed request bodies (``Content-Encoding``), bounded.

Claude Code gzips its messages body when it trusts cmm's CA through the system store, so the
model finder must read through the compression. A few hundred bytes of brotli or 16 KB of zstd can
stand for gigabytes, so a body must cost a worker no more than a plain body at the limit: every
decompression call produces at most one step of output (zlib is asked for less once the limit is
near), each piece goes straight on to the next layer, and the 413 comes the moment a layer passes
the limit. Nothing decoded waits between layers, so a bomb is stopped one step past the limit,
and the decompressors (and their windows) are let go of as soon as the body ends or fails.
"""

from __future__ import annotations

import zlib
from typing import Callable

import brotli
import zstandard

from cmm.core.errors import HttpError

SUPPORTED = ("gzip", "x-gzip", "deflate", "br", "zstd")
MAX_CODINGS = 2  # "gzip, gzip" is the most anything real sends; more is only good for bombs
STEP = 32 * 1024  # the most one decompression call produces: brotli's first output block is this size
_SLICE = 16 * 1024  # input per zlib/brotli call: both copy aside what they have not consumed yet
_ZSTD_SLICE = 1024  # input per zstd call: past the limit, at most this much more is decoded (and dropped)
_ZSTD_WINDOW = 8 << 20  # the window HTTP's zstd coding allows: a frame asking for more is refused, not allocated
_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # ...through 0x184D2A5F: frames of metadata, decoded to nothing

Emit = Callable[[bytes], None]


class _Malformed(Exception):
    """Corrupt input that cmm notices itself rather than a decompression library."""


class _Pieces:
    """The last layer's output for one ``feed``; apart from the decoder so that the chain of
    layers holds no cycle and a dropped decoder frees its windows at once."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def __call__(self, piece: bytes) -> None:
        self.pieces.append(piece)

    def take(self) -> list[bytes]:
        pieces, self.pieces = self.pieces, []
        return pieces


class _Outlet:
    """One layer's output: counted against the limit, then handed straight to the next layer."""

    def __init__(self, limit: int, step: int, onward: Emit) -> None:
        self._limit = limit
        self._step = step
        self._onward = onward
        self.produced = 0

    def room(self) -> int:
        """The most the next call may produce: a byte past the limit is enough to refuse the body."""
        return min(self._step, self._limit - self.produced + 1)

    def __call__(self, piece: bytes) -> None:
        if not piece:
            return
        self.produced += len(piece)
        if self.produced > self._limit:
            raise HttpError(413, f"Decoded request body exceeds the {self._limit}-byte limit")
        self._onward(piece)


class _Stage:
    """One coding layer: ``feed`` hands each decoded piece to ``out`` as soon as it exists;
    ``done`` says the compressed stream ended."""

    def feed(self, data: bytes, out: _Outlet) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def done(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class _Zlib(_Stage):
    def __init__(self, coding: str, step: int) -> None:
        self._coding = coding
        self._object = zlib.decompressobj(31 if coding in ("gzip", "x-gzip") else 15)
        self._first = True

    def feed(self, data: bytes, out: _Outlet) -> None:
        if self._first and data and self._coding == "deflate" and (data[0] & 0x0F) != 8:
            self._object = zlib.decompressobj(-15)  # raw deflate, as some clients send "deflate"
        self._first = self._first and not data
        for start in range(0, len(data), _SLICE):
            self._decode(data[start : start + _SLICE], out)

    def _decode(self, data: bytes, out: _Outlet) -> None:
        while True:
            room = out.room()
            piece = self._object.decompress(data, room)
            data = self._object.unconsumed_tail
            out(piece)
            if self._object.eof:
                if data or self._object.unused_data:
                    raise _Malformed("data after the end of the compressed stream")
                return
            if not data and len(piece) < room:
                return  # all input decoded, and no output left waiting inside zlib

    def done(self) -> bool:
        return self._object.eof


class _Brotli(_Stage):
    def __init__(self, coding: str, step: int) -> None:
        self._object = brotli.Decompressor()

    def feed(self, data: bytes, out: _Outlet) -> None:
        # brotli's output buffer starts with one 32 KiB block and doubles until it reaches the
        # limit asked for, so asking for more than a byte can return up to twice that: asking
        # for one byte returns at most the first block, whatever room is left. A call returns
        # nothing only once all its input is consumed and no output waits inside (a full block
        # may leave more of either), so the input is drained until then.
        for start in range(0, len(data), _SLICE):
            piece = self._object.process(data[start : start + _SLICE], output_buffer_limit=1)
            while piece:
                out(piece)
                piece = self._object.process(b"", output_buffer_limit=1)

    def done(self) -> bool:
        return bool(self._object.is_finished())


class _ZstdSink:
    """Where the zstd writer puts each piece (at most its write size). A failure downstream is
    kept, not raised: an exception raised into the writer would leak its output buffer. Once one
    is kept, the rest of the writer's input is decoded for nothing and dropped."""

    def __init__(self) -> None:
        self.out: _Outlet | None = None
        self.failure: Exception | None = None

    def write(self, piece: bytes) -> int:
        if self.failure is None and self.out is not None:
            try:
                self.out(piece)
            except Exception as failure:  # re-raised by _Zstd.feed once the writer returns
                self.failure = failure
        return len(piece)


class _ZstdFrames:
    """Follows a zstd body's frame and block headers to tell where its frames end: the bounded
    zstd writer cannot say whether a body was cut short, or whether bytes follow its end."""

    def __init__(self) -> None:
        self._field = bytearray()
        self._want = 4
        self._then: Callable[[_ZstdFrames, bytes], None] = _ZstdFrames._magic  # unbound: no cycle
        self._skip = 0  # bytes to pass over before the next field
        self._checksum = False
        self._frames = 0

    def feed(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            if self._skip:
                taken = min(self._skip, len(data) - at)
                self._skip -= taken
                at += taken
                continue
            taken = min(self._want - len(self._field), len(data) - at)
            self._field += data[at : at + taken]
            at += taken
            if len(self._field) == self._want:
                field, self._field = bytes(self._field), bytearray()
                self._then(self, field)

    def done(self) -> bool:
        return self._frames > 0 and self._then is _ZstdFrames._magic and not self._field and not self._skip

    def _expect(self, want: int, then: Callable[[_ZstdFrames, bytes], None], skip: int = 0) -> None:
        self._want, self._then, self._skip = want, then, skip

    def _magic(self, field: bytes) -> None:
        magic = int.from_bytes(field, "little")
        if magic == _ZSTD_MAGIC:
            self._frames += 1
            self._expect(1, _ZstdFrames._descriptor)
        elif magic & 0xFFFFFFF0 == _ZSTD_SKIPPABLE:
            self._frames += 1
            self._expect(4, _ZstdFrames._skippable)
        else:
            raise _Malformed("data after the end of the compressed stream" if self._frames else "not a zstd frame")

    def _skippable(self, field: bytes) -> None:
        self._expect(4, _ZstdFrames._magic, skip=int.from_bytes(field, "little"))

    def _descriptor(self, field: bytes) -> None:
        flags = field[0]
        if flags & 0x08:
            raise _Malformed("reserved bit set in a zstd frame header")
        single_segment = bool(flags & 0x20)
        size_field = (1 if single_segment else 0, 2, 4, 8)[flags >> 6]
        self._checksum = bool(flags & 0x04)
        # Never zero: without a window byte the frame has a content size.
        self._expect((0 if single_segment else 1) + (0, 1, 2, 4)[flags & 0x03] + size_field, _ZstdFrames._header)

    def _header(self, field: bytes) -> None:
        self._expect(3, _ZstdFrames._block)

    def _block(self, field: bytes) -> None:
        header = int.from_bytes(field, "little")
        last, kind, size = header & 1, header >> 1 & 3, header >> 3
        if kind == 3:
            raise _Malformed("reserved zstd block type")
        content = 1 if kind == 1 else size  # an RLE block carries its one byte
        if not last:
            self._expect(3, _ZstdFrames._block, skip=content)
        else:
            self._expect(4, _ZstdFrames._magic, skip=content + (4 if self._checksum else 0))


class _Zstd(_Stage):
    def __init__(self, coding: str, step: int) -> None:
        self._frames = _ZstdFrames()
        self._sink = _ZstdSink()
        decompressor = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW)
        self._writer = decompressor.stream_writer(self._sink, write_size=step)  # type: ignore[arg-type]  # has write()

    def feed(self, data: bytes, out: _Outlet) -> None:
        self._frames.feed(data)
        self._sink.out = out
        for start in range(0, len(data), _ZSTD_SLICE):
            self._writer.write(data[start : start + _ZSTD_SLICE])
            if self._sink.failure is not None:
                # Raised without its old traceback, and kept nowhere: that traceback holds this
                # stage, whose writer holds the sink, a cycle through an object that the garbage
                # collector cannot see into, so the whole decoder (its window too) would leak.
                failure, self._sink.failure = self._sink.failure, None
                try:
                    raise failure.with_traceback(None)
                finally:
                    del failure

    def done(self) -> bool:
        return self._frames.done()


_STAGES: dict[str, Callable[[str, int], _Stage]] = {
    "gzip": _Zlib, "x-gzip": _Zlib, "deflate": _Zlib, "br": _Brotli, "zstd": _Zstd,
}


def unsupported(codings: list[str]) -> list[str]:
    return [c for c in codings if c not in SUPPORTED and c != "identity"]


class BodyDecoder:
    """Decodes a body sent with ``codings`` (as listed in Content-Encoding, applied in order).

    Every layer may produce at most ``limit`` bytes; ``step`` is the most one decompression call
    produces, so no layer ever holds more than ``limit + step`` decoded bytes.
    """

    def __init__(self, codings: list[str], limit: int, *, step: int = STEP, sink: Emit | None = None) -> None:
        """``sink``: where decoded pieces go the moment they exist instead of being returned by
        ``feed``, so that a reader that only looks at them never holds a feed's whole output."""
        if unsupported(codings):
            raise ValueError(f"unsupported content-coding {', '.join(unsupported(codings))}")
        names = [c for c in codings if c != "identity"]
        if len(names) > MAX_CODINGS:
            raise HttpError(415, f"Content-Encoding {', '.join(names)} stacks {len(names)} codings; "
                                 f"cmm decodes at most {MAX_CODINGS}")
        self.names = ", ".join(names)
        stages = [_STAGES[c](c, step) for c in reversed(names)]  # the last coding applied is undone first
        self._stages = stages
        self._pieces = _Pieces()
        self._outlets: list[_Outlet] = []
        entry: Emit = self._pieces if sink is None else sink
        for stage in reversed(stages):  # each layer's outlet feeds the next layer
            outlet = _Outlet(limit, step, entry)
            self._outlets.insert(0, outlet)
            entry = _feeder(stage, outlet)
        self._entry = entry
        self._plain = 0  # bytes passed through when every coding is identity

    def feed(self, data: bytes) -> list[bytes]:
        """Decoded pieces for ``data``; HttpError 400 for corrupt data, 413 past the limit."""
        try:
            self._entry(data)
        except (zlib.error, brotli.error, zstandard.ZstdError, _Malformed) as error:
            self._close()
            raise HttpError(400, f"Malformed {self.names} request body: {error}") from None
        except BaseException:
            self._close()
            raise
        if not self._outlets:
            self._plain += len(data)
        return self._pieces.take()

    @property
    def decoded(self) -> int:
        """Decoded bytes so far, counting the step that passed the limit if one did."""
        return self._outlets[-1].produced if self._outlets else self._plain

    def finish(self) -> None:
        """The compressed body ended: it must have been complete."""
        complete = all(stage.done() for stage in self._stages)
        self._close()
        if not complete:
            raise HttpError(400, f"Truncated {self.names} request body")

    def _close(self) -> None:
        """Let go of what was decoded and of the decompressors (a brotli window alone can be
        16 MiB) the moment the body ends or fails: the connection holding this decoder may live on
        until the next request, or until a garbage collection."""
        self._plain = self.decoded
        self._pieces.take()
        self._stages, self._outlets, self._entry = [], [], _ended


def _ended(data: bytes) -> None:
    if data:
        raise _Malformed("data after the body ended or failed")


def _feeder(stage: _Stage, out: _Outlet) -> Emit:
    return lambda data: stage.feed(data, out)
