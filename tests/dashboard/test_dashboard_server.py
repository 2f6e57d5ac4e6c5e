"""The dashboard's resources driven in memory (treq's StubTreq): the guard (token, Host), the
page's headers, the JSON endpoints' shapes and errors, and the event stream."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import treq
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.python.failure import Failure

from cmm.dashboard import server, store
from store_rows import create_store, insert, request_row

NOW = 1_800_000_000.0
TOKEN = "s3cret-token_value"
BASE = "http://127.0.0.1:8399"


def result(d: defer.Deferred[Any]) -> Any:
    found: list[Any] = []
    d.addBoth(found.append)
    assert found, "not answered"
    if isinstance(found[0], Failure):
        found[0].raiseException()
    return found[0]


class Client:
    def __init__(self, dashboard: server.Dashboard) -> None:
        self.stub = StubTreq(server.resource_tree(dashboard))

    def get(self, path: str, **kwargs: Any) -> Any:
        d = self.stub.get(BASE + path, **kwargs)
        self.stub.flush()
        return result(d)

    def body(self, response: Any) -> bytes:
        d = treq.content(response)
        self.stub.flush()
        return bytes(result(d))

    def json(self, path: str, status: int = 200, **kwargs: Any) -> Any:
        response = self.get(path, **kwargs)
        body = self.body(response)
        assert response.code == status, body
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
        return json.loads(body)


def in_place(work: Any) -> defer.Deferred[Any]:
    """Store queries run at once: the reactor's thread pool is not running in these tests."""
    return defer.maybeDeferred(work)


def running() -> dict[str, Any]:
    return {"running": True, "pid": 4242, "note": "", "routes": [
        {"route": "claude-haiku-4-5* → gemini-2.5-flash", "requests": 7, "errors": 1, "p50_ms": 120.0,
         "p99_ms": 900.0, "bytes_in": 100, "bytes_out": 200}], "workers": []}


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "usage.sqlite3"
    create_store(path)
    return path


@pytest.fixture
def clock() -> task.Clock:
    found = task.Clock()
    found.advance(NOW)
    return found


@pytest.fixture
def dashboard(store_path: Path, clock: task.Clock) -> server.Dashboard:
    async def live() -> dict[str, Any]:
        return running()

    return server.Dashboard(store_path, token=TOKEN, live=live, clock=clock, now=clock.seconds, port=8399,
                            run_query=in_place)


@pytest.fixture
def client(dashboard: server.Dashboard) -> Client:
    return Client(dashboard)


# --- the guard -------------------------------------------------------------------------------------

PATHS = ["/", "/api/summary", "/api/requests", "/api/series", "/api/status", "/api/feed", "/api/panels",
         "/api/nothing", "/favicon.ico"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper()])
def test_without_the_right_token_every_path_is_forbidden(client: Client, path: str, token: str | None) -> None:
    query = "" if token is None else f"?token={token}"
    response = client.get(path + query)
    assert response.code == 403
    assert b"token" in client.body(response)
    assert response.headers.getRawHeaders(b"access-control-allow-origin") is None


@pytest.mark.parametrize("host", ["evil.example:8399", "127.0.0.1:8398", "localhost", "127.0.0.1", "[::1]:8399",
                                  "127.0.0.1.evil.example:8399", ""])
def test_another_host_name_is_forbidden_even_with_the_token(client: Client, host: str) -> None:
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends its own Host."""
    response = client.get(f"/api/status?token={TOKEN}", headers={"Host": [host]})
    assert response.code == 403


@pytest.mark.parametrize("host", ["127.0.0.1:8399", "localhost:8399", "LOCALHOST:8399"])
def test_this_server_s_own_names_are_allowed(client: Client, host: str) -> None:
    response = client.get(f"/api/status?token={TOKEN}", headers={"Host": [host]})
    assert response.code == 200


def test_the_token_may_come_as_a_bearer_header(client: Client) -> None:
    assert client.get("/api/status", headers={"Authorization": [f"Bearer {TOKEN}"]}).code == 200
    assert client.get("/api/status", headers={"Authorization": ["Bearer nope"]}).code == 403


def test_an_unknown_path_with_the_token_is_not_found(client: Client) -> None:
    assert client.get(f"/api/nothing?token={TOKEN}").code == 404


def test_only_reading_is_allowed(client: Client) -> None:
    d = client.stub.post(f"{BASE}/api/summary?token={TOKEN}", data=b"{}")
    client.stub.flush()
    assert result(d).code == 405


def test_before_listening_nothing_is_allowed(store_path: Path) -> None:
    response = Client(server.Dashboard(store_path, token=TOKEN, run_query=in_place)).get(f"/?token={TOKEN}")
    assert response.code == 403


# --- the page --------------------------------------------------------------------------------------


def test_the_page_is_self_contained_under_a_strict_policy(client: Client, store_path: Path) -> None:
    insert(store_path, request_row(time=NOW - 30, model="claude-<b>haiku"))
    response = client.get(f"/?token={TOKEN}&range=day")
    html = client.body(response).decode()
    assert response.code == 200
    policy = response.headers.getRawHeaders(b"content-security-policy")[0].decode()
    nonce = re.search(r"'nonce-([\w-]+)'", policy).group(1)  # type: ignore[union-attr]
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert html.count(f'nonce="{nonce}"') == 2  # the one style and the one script
    assert re.findall(r"<(?:script|style)\b(?![^>]*nonce)", html) == []
    assert re.findall(r"(?:src|href)=\"(?:https?:)?//", html) == []  # nothing from elsewhere
    assert " style=" not in html  # inline style attributes would be blocked
    assert response.headers.getRawHeaders(b"x-frame-options") == [b"DENY"]
    assert response.headers.getRawHeaders(b"referrer-policy") == [b"no-referrer"]
    assert '<a href="?token=s3cret-token_value&amp;range=day" aria-current="page">Last day</a>' in html
    assert html.count('role="img"') == 3 and "<main>" in html and "<caption>" in html
    assert "<b>haiku" not in html


def test_a_second_load_gets_a_new_nonce(client: Client) -> None:
    policies = {client.get(f"/?token={TOKEN}").headers.getRawHeaders(b"content-security-policy")[0] for _ in range(2)}
    assert len(policies) == 2


def test_the_page_shows_why_there_is_no_data(tmp_path: Path, clock: task.Clock) -> None:
    dashboard = server.Dashboard(tmp_path / "absent.sqlite3", token=TOKEN, clock=clock, now=clock.seconds, port=8399,
                                 run_query=in_place)
    client = Client(dashboard)
    response = client.get(f"/?token={TOKEN}")
    assert response.code == 200
    assert "no usage recorded yet" in client.body(response).decode()


# --- JSON ------------------------------------------------------------------------------------------


def test_summary_json(client: Client, store_path: Path) -> None:
    insert(store_path, request_row(time=NOW - 60), request_row(time=NOW - 120, status=429))
    found = client.json(f"/api/summary?token={TOKEN}&range=hour")
    assert found["range"] == "hour" and found["requests"] == 2 and found["errors"] == 1
    assert set(found) >= {"start", "end", "input_tokens", "output_tokens", "cache_creation_input_tokens",
                          "cache_read_input_tokens", "cache_hit_rate", "p50_ms", "p99_ms", "routes"}


def test_requests_json_by_id_and_by_age(client: Client, store_path: Path) -> None:
    ids = insert(store_path, *(request_row(time=NOW - 600 + i * 60, model=f"m{i}") for i in range(5)))
    assert [r["model"] for r in client.json(f"/api/requests?token={TOKEN}&limit=2")["requests"]] == ["m3", "m4"]
    assert [r["id"] for r in client.json(f"/api/requests?token={TOKEN}&after={ids[2]}")["requests"]] == ids[3:]
    assert [r["model"] for r in client.json(f"/api/requests?token={TOKEN}&since=6m")["requests"]] == ["m4"]
    assert len(client.json(f"/api/requests?token={TOKEN}&since={NOW - 600}")["requests"]) == 5


@pytest.mark.parametrize("query, message", [
    ("since=yesterday", "since='yesterday'"),
    ("since=nan", "not a time"),
    ("limit=0", "limit=0 is outside"),
    ("limit=x", "not a whole number"),
    ("after=-1", "after=-1 is outside"),
])
def test_bad_parameters_get_400_with_the_reason(client: Client, query: str, message: str) -> None:
    assert message in client.json(f"/api/requests?token={TOKEN}&{query}", status=400)["error"]


def test_an_unknown_range_gets_400(client: Client) -> None:
    assert "use one of hour, day, week" in client.json(f"/api/series?token={TOKEN}&range=year", status=400)["error"]


def test_series_json(client: Client, store_path: Path) -> None:
    insert(store_path, request_row(time=NOW - 1, duration=0.25))
    found = client.json(f"/api/series?token={TOKEN}&range=week")
    assert found["range"] == "week" and found["width"] == 3 * 3600 and len(found["buckets"]) == 56
    assert found["buckets"][-1]["requests"] == 1 and found["buckets"][-1]["p50_ms"] == 250.0


def test_a_missing_store_gets_503(tmp_path: Path) -> None:
    client = Client(server.Dashboard(tmp_path / "absent.sqlite3", token=TOKEN, port=8399, run_query=in_place))
    assert "no usage recorded yet" in client.json(f"/api/summary?token={TOKEN}", status=503)["error"]


def test_status_json(client: Client) -> None:
    found = client.json(f"/api/status?token={TOKEN}")
    assert found["cmm"] == running() and found["store"]["ok"] is True


def test_status_survives_a_failing_live_source(store_path: Path) -> None:
    async def broken() -> dict[str, Any]:
        raise ConnectionResetError()

    client = Client(server.Dashboard(store_path, token=TOKEN, live=broken, port=8399, run_query=in_place))
    found = client.json(f"/api/status?token={TOKEN}")
    assert found["cmm"]["running"] is False and "ConnectionResetError" in found["cmm"]["note"]


def test_panels_json_holds_the_charts_and_totals(client: Client) -> None:
    found = client.json(f"/api/panels?token={TOKEN}&range=day")
    assert set(found["charts"]) == {"requests", "tokens", "latency"}
    assert all(svg.startswith("<svg") for svg in found["charts"].values())
    assert "<dl" in found["totals"]


# --- the event stream --------------------------------------------------------------------------------


def events(data: bytes) -> list[tuple[str, dict[str, str]]]:
    found = []
    for block in data.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            found.append((fields["event"], fields))
    return found


def test_the_feed_sends_the_backlog_then_each_new_row(client: Client, store_path: Path, clock: task.Clock) -> None:
    ids = insert(store_path, request_row(model="old-1"), request_row(model="old-2"))
    response = client.get(f"/api/feed?token={TOKEN}")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    chunks: list[bytes] = []
    treq.collect(response, chunks.append)
    client.stub.flush()
    first = events(b"".join(chunks))
    assert [kind for kind, _ in first] == ["status", "request", "request", "ready"]
    assert [json.loads(f["data"])["model"] for kind, f in first if kind == "request"] == ["old-1", "old-2"]
    assert [f["id"] for kind, f in first if kind == "request"] == [str(i) for i in ids]
    assert json.loads(first[0][1]["data"])["cmm"]["pid"] == 4242

    chunks.clear()
    (new,) = insert(store_path, request_row(model="new-1"))
    clock.advance(server.FEED_INTERVAL)
    client.stub.flush()
    later = events(b"".join(chunks))
    assert [(kind, f.get("id")) for kind, f in later if kind == "request"] == [("request", str(new))]

    chunks.clear()
    clock.advance(server.FEED_INTERVAL)
    client.stub.flush()
    assert [kind for kind, _ in events(b"".join(chunks))] == ["status"]  # nothing new, only the counters


def test_a_reconnecting_feed_resumes_after_the_last_event_id(client: Client, store_path: Path) -> None:
    ids = insert(store_path, *(request_row(model=f"m{i}") for i in range(4)))
    response = client.get(f"/api/feed?token={TOKEN}", headers={"Last-Event-ID": [str(ids[1])]})
    chunks: list[bytes] = []
    treq.collect(response, chunks.append)
    client.stub.flush()
    sent = [f["id"] for kind, f in events(b"".join(chunks)) if kind == "request"]
    assert sent == [str(i) for i in ids[2:]]


def test_a_feed_on_an_empty_store_sends_the_first_row_that_arrives(client: Client, store_path: Path,
                                                                  clock: task.Clock) -> None:
    response = client.get(f"/api/feed?token={TOKEN}")
    chunks: list[bytes] = []
    treq.collect(response, chunks.append)
    client.stub.flush()
    insert(store_path, request_row(model="first"))
    clock.advance(server.FEED_INTERVAL)
    client.stub.flush()
    assert [json.loads(f["data"])["model"] for kind, f in events(b"".join(chunks)) if kind == "request"] == ["first"]


def test_a_quiet_feed_sends_keep_alives_and_stops_polling_when_closed(
        dashboard: server.Dashboard, store_path: Path, clock: task.Clock) -> None:
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:8399"])
    assert server.Feed(dashboard).render_GET(request) is server.server.NOT_DONE_YET  # type: ignore[arg-type]
    clock.advance(server.KEEPALIVE)
    assert b": keep-alive\n\n" in b"".join(request.written)
    assert clock.getDelayedCalls()  # the poll is scheduled
    request.processingFailed(Failure(ConnectionResetError()))  # the browser went away
    assert clock.getDelayedCalls() == []


def test_a_bad_last_event_id_gets_400(client: Client) -> None:
    assert client.json(f"/api/feed?token={TOKEN}", status=400, headers={"Last-Event-ID": ["abc"]})


def test_store_queries_run_away_from_the_reactor_and_answer_when_done(dashboard: server.Dashboard,
                                                                      store_path: Path) -> None:
    """A slow query (a busy store's week) must not hold up the feeds: the answer waits for it."""
    pending: list[tuple[Any, defer.Deferred[Any]]] = []

    def later(work: Any) -> defer.Deferred[Any]:
        pending.append((work, defer.Deferred()))
        return pending[-1][1]

    dashboard.run_query = later
    client = Client(dashboard)
    insert(store_path, request_row(time=NOW - 5))
    d = client.stub.get(f"{BASE}/api/summary?token={TOKEN}")
    answered: list[Any] = []
    d.addBoth(answered.append)
    client.stub.flush()
    assert answered == [] and len(pending) == 1
    work, answer = pending.pop()
    answer.callback(work())
    client.stub.flush()
    (response,) = answered
    assert response.code == 200 and json.loads(client.body(response))["requests"] == 1


def test_an_unexpected_failure_gets_500_and_is_logged(dashboard: server.Dashboard) -> None:
    from twisted.logger import globalLogPublisher

    def broken(work: Any) -> defer.Deferred[Any]:
        return defer.fail(ZeroDivisionError("boom"))

    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        dashboard.run_query = broken
        found = Client(dashboard).json(f"/api/summary?token={TOKEN}", status=500)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert "failed" in found["error"]
    failures = [event.get("log_failure") or event.get("failure") for event in seen]
    assert any(f is not None and f.check(ZeroDivisionError) for f in failures)


def test_head_on_the_feed_starts_no_stream(client: Client, clock: task.Clock) -> None:
    d = client.stub.head(f"{BASE}/api/feed?token={TOKEN}")
    client.stub.flush()
    assert result(d).code == 200
    assert clock.getDelayedCalls() == []


def test_a_read_sees_one_snapshot_and_keeps_the_charts_buckets(store_path: Path) -> None:
    """Counts and the ranks picked from them come from one read transaction; the dashboard keeps
    the buckets it drew for the next redraw."""
    dashboard = server.Dashboard(store_path)
    assert dashboard.read(lambda db: db.in_transaction) is True
    insert(store_path, request_row(time=NOW - 30))
    [first] = [b for b in dashboard.read(lambda db: store.series(db, store.RANGES["hour"], NOW, dashboard.series_cache))
               if b.requests]
    assert first.requests == 1 and dashboard.series_cache.kept
