"""Token usage read from messages answers: streamed and JSON, plain and compressed, split anywhere."""

from __future__ import annotations

import gzip
import json
import time
import zlib

import attrs
import brotli
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from cmm.core import usage as usage_module
from cmm.core.http_head import parse_response_head
from cmm.core.usage import (HEAD_BYTES, TAIL_BYTES, BodyEnds, Usage, UsageReader, reader_for, usage_fed, usage_of,
                             usage_reader)
from cmm.testing.fakes import fake_usage, message_json, sse_event, sse_events

MODEL = "claude-sonnet-4-5-20250929"
PROMPT_TOKENS = 1003
EXPECTED_STREAM = Usage(model=MODEL, **fake_usage(PROMPT_TOKENS, 7))
EXPECTED_JSON = Usage(model=MODEL, **fake_usage(PROMPT_TOKENS, 5))


def stream(**extra: object) -> bytes:
    return b"".join(sse_events(message_id="msg_1", model=MODEL, provider="anthropic", input_tokens=PROMPT_TOKENS,
                               deltas=7, **extra))  # type: ignore[arg-type]


def answer(**extra: object) -> bytes:
    return message_json(message_id="msg_1", model=MODEL, provider="anthropic", input_tokens=PROMPT_TOKENS,
                        **extra)  # type: ignore[arg-type]


def read(kind: str, pieces: list[bytes], codings: tuple[str, ...] = (), complete: bool = True) -> Usage:
    reader = reader_for(kind, codings)
    for piece in pieces:
        reader.feed((piece,), len(piece))
    return reader.finish(complete)


def splits(body: bytes) -> list[list[bytes]]:
    """The body cut in two at every byte boundary (empty pieces at both ends included)."""
    return [[body[:at], body[at:]] for at in range(len(body) + 1)]


def test_fake_stream_counts_are_realistic() -> None:
    assert EXPECTED_STREAM.cache_read_input_tokens == PROMPT_TOKENS // 2 and EXPECTED_STREAM.input_tokens
    assert EXPECTED_STREAM.output_tokens == 7  # message_delta's count, not message_start's placeholder 1


@pytest.mark.parametrize("extra", [{}, {"thinking": True, "redacted": True, "tool_use": "Bash"}])
def test_stream_split_at_every_byte(extra: dict[str, object]) -> None:
    body = stream(**extra)
    for pieces in splits(body):
        assert read("sse", pieces) == EXPECTED_STREAM, len(pieces[0])


def test_stream_split_at_every_byte_with_small_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ends just large enough for the two events, so that most of the stream is let go of."""
    body = stream(thinking=True)
    first_event = body.index(b"\n\n") + 2
    last_events = len(body) - body.rindex(b"event: message_delta")
    monkeypatch.setattr(usage_module, "HEAD_BYTES", first_event)
    monkeypatch.setattr(usage_module, "TAIL_BYTES", last_events)
    assert first_event + last_events < len(body) // 2
    for pieces in splits(body):
        assert read("sse", pieces) == EXPECTED_STREAM, len(pieces[0])


def test_stream_byte_by_byte_and_crlf() -> None:
    body = stream()
    assert read("sse", [body[i : i + 1] for i in range(len(body))]) == EXPECTED_STREAM
    crlf = body.replace(b"\n", b"\r\n")
    for pieces in splits(crlf):
        assert read("sse", pieces) == EXPECTED_STREAM


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_stream_any_split(cuts: list[int]) -> None:
    body = stream(thinking=True, tool_use="Read")
    points = sorted({min(cut, len(body)) for cut in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)])]
    assert read("sse", pieces) == EXPECTED_STREAM


def test_stream_cut_short() -> None:
    """What message_start said counts even when the stream is cut before its message_delta."""
    body = stream()
    cut = body.index(b"event: message_delta")
    assert read("sse", [body[:cut]], complete=False) == Usage(model=MODEL, **fake_usage(PROMPT_TOKENS, 1))


def test_message_delta_counts_win() -> None:
    start = sse_event("message_start", {"type": "message_start", "message": {
        "model": "m", "usage": {"input_tokens": 10, "cache_read_input_tokens": 0, "output_tokens": 1}}})
    delta = sse_event("message_delta", {"type": "message_delta", "delta": {}, "usage": {
        "input_tokens": 12, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 40, "output_tokens": 9}})
    assert read("sse", [start + delta]) == Usage(12, 9, 3, 40, "m")


def test_only_real_events_count() -> None:
    """Text that quotes an event, an event line without data, odd values: none of them count."""
    quoted = sse_event("content_block_delta", {"type": "content_block_delta", "delta": {
        "type": "text_delta", "text": 'data: {"type":"message_delta","usage":{"output_tokens":999}}'}})
    named = b'event: message_delta\n: {"type":"message_delta","usage":{"output_tokens":998}}\n\n'
    bad = sse_event("message_delta", {"type": "message_delta", "usage": {
        "output_tokens": True, "input_tokens": -4, "cache_read_input_tokens": "12"}})
    broken = b'data: {"type":"message_delta","usage":{"output_tokens":5\n\n'
    assert read("sse", [bad + broken + named + quoted]) == Usage()
    assert read("sse", [b'data: {"type":"message_start","message":"x"}\n\n']) == Usage()


@pytest.mark.parametrize("piece", [1, 1000, 70_000])
def test_what_is_kept_is_bounded(piece: int) -> None:
    """Of a long stream only its ends are kept (the pieces by reference), and they still hold
    both events."""
    body = b"".join(sse_events(
        message_id="m", model=MODEL, provider="anthropic", input_tokens=PROMPT_TOKENS, deltas=3000, delta_size=500))
    reader = UsageReader("sse")
    ends = reader
    for count, at in enumerate(range(0, len(body) if piece > 1 else 100_000, piece)):
        chunk = body[at : at + piece]
        reader.feed((chunk,), len(chunk))
        if count % 97 == 0:
            assert ends._tail_size < 2 * TAIL_BYTES + piece and len(ends.head()) <= HEAD_BYTES
    if piece > 1:
        assert reader.finish() == Usage(model=MODEL, **fake_usage(PROMPT_TOKENS, 3000))


def test_the_head_keeps_no_more_than_its_size_of_a_large_read() -> None:
    """A read of many events, or one large piece: the head holds its first HEAD_BYTES only, not
    the whole read for the answer's life."""
    events = [b"data: %d\n\n" % n for n in range(3 * HEAD_BYTES)]
    ends = BodyEnds()
    ends.feed(events, sum(map(len, events)))
    assert sum(map(len, ends._head)) <= HEAD_BYTES + len(events[0])
    large = bytes(10 * HEAD_BYTES)
    ends = BodyEnds()
    ends.feed((large,), len(large))
    assert [len(piece) for piece in ends._head] == [HEAD_BYTES] and ends.head() == large[:HEAD_BYTES]


def test_ends_of_many_small_pieces() -> None:
    ends = BodyEnds()
    data = bytes(range(256)) * 1000
    for at in range(0, len(data), 100):
        ends.feed([data[at : at + 50], data[at + 50 : at + 100]], 110)  # counted with some framing
    assert ends.head() == data[:HEAD_BYTES]
    tail = ends.tail()
    assert data.endswith(tail) and TAIL_BYTES <= len(tail) * 110 // 100 < 2 * TAIL_BYTES + 110
    assert ends.size == len(data) * 110 // 100


def test_json_split_at_every_byte() -> None:
    body = answer(thinking=True, tool_use="Bash")
    for pieces in splits(body):
        assert read("json", pieces) == EXPECTED_JSON


def test_large_json_read_from_its_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the tail size only its first and last bytes are kept; a usage object inside the
    content (a tool's input here) is not taken for the answer's."""
    monkeypatch.setattr(usage_module, "TAIL_BYTES", 300)
    monkeypatch.setattr(usage_module, "HEAD_BYTES", 120)
    decoy = {"type": "tool_use", "id": "t", "name": "Write", "input": {"usage": {"input_tokens": 77}}}
    document = json.loads(answer(pad_to=2000))
    document["content"].append(decoy)
    body = json.dumps(document).encode()  # with spaces after the colons
    assert len(body) > 2000
    for pieces in splits(body):
        assert read("json", pieces) == EXPECTED_JSON, len(pieces[0])


def test_only_the_usage_object_s_own_fields() -> None:
    """Counts in an object nested in usage, or after it, are not its own."""
    nested = {"input_tokens": 3, "cache_creation": {"ephemeral_5m_input_tokens": 4, "output_tokens": 99},
              "iterations": [{"input_tokens": 98}], "output_tokens": 6, "service_tier": "standard"}
    body = json.dumps({"model": "m", "usage": nested, "extra": {"cache_read_input_tokens": 97}}).encode()
    assert read("json", [body]) == Usage(input_tokens=3, output_tokens=6, model="m")
    delta = sse_event("message_delta", {"type": "message_delta", "usage": nested})
    assert read("sse", [delta]) == Usage(input_tokens=3, output_tokens=6)


_SPACES = st.sampled_from(["", "", " ", "\n "])
_NAMES = st.sampled_from([*usage_module.TOKEN_FIELDS, "service_tier", "cache_creation", "x"])
_VALUES = st.one_of(st.integers(0, 10**20).map(str), st.sampled_from(['"standard"', "1.5", "2e3", "-1", "null", "{}",
                                                                       '{"output_tokens":9}', '{"a":{"b":1}}',
                                                                       '"}"', '"{"']))


@given(st.lists(st.tuples(_SPACES, _NAMES, _SPACES, _VALUES, _SPACES), max_size=8), _SPACES, st.sampled_from(["}", "}}", ""]))
@settings(max_examples=400, deadline=None)
def test_the_compact_reading_agrees_with_the_patterns(fields: list[tuple[str, str, str, str, str]], space: str,
                                                      end: str) -> None:
    """Where find-only reading decides, it decides as the regular expressions do."""
    inner = ",".join(f'{a}"{name}"{b}:{c}{value}' for a, name, b, value, c in fields)
    data = f'"usage":{space}{{{inner}{end}'.encode()
    compact = usage_module._compact_counts(data, 0)
    if compact is not usage_module._UNDECIDED:
        assert compact == usage_module._pattern_counts(data, 0)
    if not space and all(not a and not b and not c and value.isdigit() and len(value) <= 18
                         for a, _, b, value, c in fields) and end:
        assert compact is not usage_module._UNDECIDED  # the usual case is the compact one


_BREAKDOWN = '"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":7},'  # Anthropic's own
_BREAKDOWNS = st.sampled_from(["", _BREAKDOWN,
                               '"cache_creation":{},', '"cache_creation":{"a":{"b":1}},', '"cache_creation":{"output_tokens":3},',
                               '"cache_creation": {},', '"cache_creation":{"x":"}"},'])


_COUNTS = st.one_of(st.integers(0, 10**6).map(str), st.sampled_from(["9" * 18, "1" * 19, "0", "007"]))


@given(st.tuples(*[_COUNTS] * 4), _BREAKDOWNS,
       st.lists(st.tuples(_SPACES, _NAMES, _SPACES, _VALUES, _SPACES), max_size=5), st.sampled_from(["}", "}}", ""]),
       st.sampled_from(["", " ", "1.5", "e3"]))
@settings(max_examples=400, deadline=None)
def test_anthropic_s_layout_read_in_one_match_agrees_with_the_patterns(
        counts: tuple[str, str, str, str], breakdown: str, rest: list[tuple[str, str, str, str, str]], end: str,
        after_output: str) -> None:
    """Where the one match for Anthropic's own layout decides, it decides as the general reading
    does; and Anthropic's answers, as they come, are read by it."""
    given, written, read, output = counts
    trailing = "".join(f',{a}"{name}"{b}:{c}{value}' for a, name, b, value, c in rest)
    data = (f'"usage":{{"input_tokens":{given},"cache_creation_input_tokens":{written},"cache_read_input_tokens":{read},'
            f'{breakdown}"output_tokens":{output}{after_output}{trailing}{end}').encode()
    if usage_module._ANTHROPIC_USAGE.match(data, 0) is not None:
        assert usage_module._counts(data, 0) == (usage_module._pattern_counts(data, 0) or None)
    if all(len(c) <= 18 for c in counts) and breakdown in ("", _BREAKDOWN) and not after_output and \
            not rest and end:
        assert usage_module._ANTHROPIC_USAGE.match(data, 0) is not None


def test_anthropic_s_answer_is_read_in_one_match() -> None:
    body = (b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-6","content":[{"type":"text",'
            b'"text":"hi"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,'
            b'"cache_creation_input_tokens":3,"cache_read_input_tokens":40,"cache_creation":{"ephemeral_5m_input_tokens":3,'
            b'"ephemeral_1h_input_tokens":0},"output_tokens":5,"service_tier":"standard"}}')
    assert usage_module._ANTHROPIC_USAGE.match(body, body.rfind(b'"usage"')) is not None
    assert read("json", [body]) == Usage(12, 5, 3, 40, "claude-opus-4-6")


@given(st.sampled_from(['"model":"m-1"', '"model": "m-1"', '"model":"m\\"x"', '"model":5,"model":"n"',
                        '"model":"unclosed', '"mode":"x"', '"model":"é"']), st.sampled_from(["", '{"a":1,']))
def test_the_model_read_by_find_is_the_pattern_s(text: str, before: str) -> None:
    data = (before + text + "}").encode()
    match = usage_module._MODEL.search(data)
    expected = None if match is None else json.loads(b'"%s"' % match.group(1))
    assert usage_module._first_model(data) == expected


def test_unclosed_usage_objects_cost_linear_time() -> None:
    """An answer's tail can be anything: an object that never closes must not make the reader
    backtrack (a nested pattern of repeats would try every way to split it)."""
    for junk in (b"a" * TAIL_BYTES, b"a {b} " * (TAIL_BYTES // 6) + b"{{", b'"input_tokens":1,' * 1000):
        began = time.perf_counter()
        assert read("json", [b'{"model":"m","usage":{' + junk]) == Usage(model="m")
        assert time.perf_counter() - began < 0.5


def test_numbers_that_are_not_counts() -> None:
    """A count too long for int(), a fraction, an exponent: not counts, and never an exception."""
    usage = b'"input_tokens":' + b"9" * 5000 + b',"output_tokens":1.5,"cache_read_input_tokens":2e3,' \
        b'"cache_creation_input_tokens":7'
    assert read("json", [b'{"model":"m","usage":{' + usage + b"}}"]) == Usage(cache_creation_input_tokens=7, model="m")


def test_a_cut_line_is_not_read() -> None:
    """A stream cut inside its message_delta line: the number there may be cut too."""
    body = stream()
    cut = body.index(b'"output_tokens":7}') + len(b'"output_tokens":')
    assert read("sse", [body[:cut] + b"1"], complete=False).output_tokens == 1  # message_start's


def test_json_model_with_escapes() -> None:
    body = answer().replace(MODEL.encode(), b"claude-\\u00e9\\\"x")
    assert read("json", [body]) == attrs.evolve(EXPECTED_JSON, model='claude-\u00e9"x')


def test_json_that_is_not_an_answer() -> None:
    assert read("json", [b'{"type":"error","error":{"type":"x"}}']) == Usage()
    assert read("json", [b"[1, 2"]) == Usage()
    assert read("json", [b'{"usage": {"input_tokens": 5}}'], complete=False) == Usage()  # cut short


def compress(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "br":
        return brotli.compress(data)
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("batch", [1, 100, usage_module.DECODE_BATCH])
@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_compressed_split_at_every_byte(coding: str, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage_module, "DECODE_BATCH", batch)
    for kind, body, expected in (("sse", stream(), EXPECTED_STREAM), ("json", answer(), EXPECTED_JSON)):
        wire = compress(coding, body)
        for pieces in splits(wire):
            assert read(kind, pieces, (coding,)) == expected, (kind, len(pieces[0]))


def test_gzipped_stream_flushed_event_by_event() -> None:
    """As a server streams it: each event readable as it comes, before the gzip stream ends."""
    compressor = zlib.compressobj(wbits=31)
    events = list(sse_events(message_id="m", model=MODEL, provider="anthropic", input_tokens=PROMPT_TOKENS))
    reader = reader_for("sse", ("gzip",))
    wire = compressor.compress(events[0]) + compressor.flush(zlib.Z_SYNC_FLUSH)
    reader.feed((wire,), len(wire))
    assert reader.finish(complete=False) == Usage(model=MODEL, **fake_usage(PROMPT_TOKENS, 1))


def test_corrupt_or_cut_compression_reads_nothing_more() -> None:
    wire = gzip.compress(answer())
    assert read("json", [wire[:10] + b"\xff" * 20 + wire[30:]], ("gzip",)) == Usage()
    assert read("json", [wire[:-8]], ("gzip",)) == Usage()


def test_decoding_stops_at_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer that decodes past the cap is let go of: nothing is read of it."""
    monkeypatch.setattr(usage_module, "MAX_DECODED", 1000)
    compressor = zlib.compressobj(wbits=31)
    events = sse_events(message_id="m", model=MODEL, provider="anthropic", input_tokens=PROMPT_TOKENS,
                        delta_size=1000)
    pieces = [compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH) for event in events]
    pieces.append(compressor.flush())
    assert read("sse", pieces, ("gzip",)) == Usage()
    monkeypatch.setattr(usage_module, "MAX_DECODED", 1 << 20)
    assert read("sse", pieces, ("gzip",)) == Usage(model=MODEL, **fake_usage(PROMPT_TOKENS, 3))


def head(status: int, *fields: str) -> bytes:
    return (f"HTTP/1.1 {status} X\r\n" + "".join(f"{field}\r\n" for field in fields) +
            "transfer-encoding: chunked\r\n\r\n").encode()


@pytest.mark.parametrize("raw, kind", [
    (head(200, "Content-Type: text/event-stream; charset=utf-8"), "sse"),
    (head(201, "content-type: Application/JSON", "content-encoding: gzip"), "json"),
    (head(200, "content-type: application/json", "content-encoding: identity"), "json"),
    (head(200, "content-type: application/json"), "json"),
    (head(400, "content-type: application/json"), None),
    (head(200, "content-type: text/plain"), None),
    (head(200), None),
    (head(200, "content-type: application/json", "content-encoding: compress"), None),
    (head(200, "content-type: application/json", "content-encoding: gzip, gzip, gzip"), None),
])
def test_reader_for_a_head(raw: bytes, kind: str | None) -> None:
    """What the head says decides what is read: an answer of another kind, status or coding is
    not read, even when its body would look like a messages answer."""
    response = parse_response_head(raw, b"POST")
    state = usage_reader(response)
    body = stream() if kind == "sse" else answer()
    if b"gzip" in raw:
        body = gzip.compress(body)
    if state is None:
        assert kind is None
        return
    state = usage_fed(state, (body,), len(body))
    assert usage_of(state, response, True) == {"sse": EXPECTED_STREAM, "json": EXPECTED_JSON, None: Usage()}[kind]


@pytest.mark.parametrize("kind", ["sse", "json"])
def test_an_answer_read_once_reads_as_one_read_in_pieces(kind: str) -> None:
    """A plain answer's first read is kept as it came, and a reader made only when a second read
    comes: either way, split anywhere, in one piece or many a read, the same counts."""
    body = stream() if kind == "sse" else answer()
    response = parse_response_head(head(200, f"content-type: {'text/event-stream' if kind == 'sse' else 'application/json'}"),
                                   b"POST")
    expected = EXPECTED_STREAM if kind == "sse" else EXPECTED_JSON
    for at in range(len(body) + 1):
        for reads in ([(body[:at], body[at:])], [(body[:at],), (body[at:],)]):
            state = usage_reader(response)
            assert state is usage_module.UNREAD
            for pieces in reads:
                state = usage_fed(state, pieces, sum(map(len, pieces)))
            assert isinstance(state, tuple) == (len(reads) == 1)
            assert usage_of(state, response, True) == expected, (at, len(reads))
    assert usage_of(usage_module.UNREAD, response, True) == Usage()  # no body came at all


def test_an_answer_read_once_keeps_the_reader_s_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read once, a large answer's model is looked for in its first HEAD_BYTES only, as a reader's is."""
    monkeypatch.setattr(usage_module, "HEAD_BYTES", 16)
    response = parse_response_head(head(200, "content-type: application/json"), b"POST")
    body = answer()
    once = usage_of(usage_fed(usage_module.UNREAD, (body,), len(body)), response, True)
    reader = reader_for("json")
    reader.feed((body,), len(body))
    assert once == reader.finish() == attrs.evolve(EXPECTED_JSON, model=None)
