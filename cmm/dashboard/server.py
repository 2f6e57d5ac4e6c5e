"""The dashboard's web server: a twisted.web resource tree behind one guard.

Anything on this computer can connect to 127.0.0.1, and any web page the user visits can make
the browser try; so every request must carry the token printed at start (in the query, or as
``Authorization: Bearer``), compared in constant time, and a ``Host`` naming this server exactly
(a page on another name that resolves to 127.0.0.1, DNS rebinding, gets 403 too). No
``Access-Control-Allow-Origin`` is ever sent, so other origins cannot read an answer. The access
log is off: the token is in every URL.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import tzinfo
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python import log
from twisted.python.failure import Failure
from twisted.web import pages, resource, server
from twisted.web.http import Request as HTTPRequest

from cmm.dashboard import charts, page, store

#: what the running cmm says (see :func:`not_running`); the CLI gives the real one
LiveStatus = Callable[[], Awaitable[dict[str, Any]]]

FEED_INTERVAL = 1.0
STATUS_EVERY = 2  # feed ticks between two status events
KEEPALIVE = 15.0
BACKLOG = 50
SECURITY_HEADERS = {
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
    b"Cross-Origin-Resource-Policy": b"same-origin",
    b"Content-Security-Policy": b"default-src 'none'; frame-ancestors 'none'",
}


def not_running(note: str = "") -> dict[str, Any]:
    return {"running": False, "pid": None, "note": note, "routes": [], "workers": []}


async def _nothing_runs() -> dict[str, Any]:
    return not_running()


@attrs.define
class Dashboard:
    """What the resources share: the store, the token, the live status and the clock."""

    store_path: Path
    token: str = attrs.field(factory=lambda: secrets.token_urlsafe(32))
    live: LiveStatus = _nothing_runs
    clock: IReactorTime | None = None  # None: the global reactor
    now: Callable[[], float] = time.time
    zone: tzinfo | None = None  # None: local time
    port: int | None = None  # set once listening: the Host header must name it
    refresh: float = 30.0  # seconds between two redraws of the page's charts and totals
    #: runs a store query away from the reactor (a week of a busy store takes a while); None: the
    #: reactor's thread pool
    run_query: Callable[[Callable[[], Any]], defer.Deferred[Any]] | None = None
    #: the charts' buckets already computed, asked again only when their rows change
    series_cache: store.SeriesCache = attrs.field(factory=store.SeriesCache)

    def reactor_clock(self) -> IReactorTime:
        if self.clock is None:
            from twisted.internet import reactor

            return reactor
        return self.clock

    def offload(self, work: Callable[[], Any]) -> defer.Deferred[Any]:
        if self.run_query is not None:
            return self.run_query(work)
        from twisted.internet import reactor as global_reactor, threads

        pooled: Any = global_reactor
        return threads.deferToThreadPool(pooled, pooled.getThreadPool(), work)

    def allowed_hosts(self) -> frozenset[bytes]:
        if self.port is None:
            return frozenset()
        return frozenset(f"{name}:{self.port}".encode() for name in ("127.0.0.1", "localhost"))

    def allows(self, request: server.Request) -> bool:
        """The Host names this server and the request carries the token."""
        host = (request.getHeader(b"host") or b"").lower()
        if host not in self.allowed_hosts():
            return False
        given = request.args.get(b"token", [b""])[0] if request.args else b""
        authorization = request.getHeader(b"authorization") or b""
        if not given and authorization.lower().startswith(b"bearer "):
            given = authorization[7:].strip()
        return hmac.compare_digest(given, self.token.encode())

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}?token={self.token}"

    def read(self, query: Callable[[sqlite3.Connection], Any]) -> Any:
        """``query`` on a fresh read-only connection (StoreUnavailable says why there is none)."""
        db = store.connect(self.store_path)
        try:
            db.execute("BEGIN")  # one snapshot: a bucket's count and the ranks picked from it agree
            return query(db)
        except sqlite3.Error as error:
            raise store.StoreUnavailable(f"cannot read {self.store_path}: {error}") from None
        finally:
            db.close()

    def store_health(self) -> dict[str, Any]:
        try:
            self.read(lambda db: db.execute("SELECT 1 FROM requests LIMIT 1").fetchall())
        except store.StoreUnavailable as error:
            return {"ok": False, "detail": str(error)}
        return {"ok": True, "detail": str(self.store_path)}

    async def status(self) -> dict[str, Any]:
        try:
            found = await self.live()
        except Exception as error:  # the page must keep working when cmm's socket misbehaves
            found = not_running(f"its counters could not be read ({type(error).__name__})")
        return {"cmm": found, "store": self.store_health()}


# --- responses -----------------------------------------------------------------------------------


def _json(request: server.Request, value: object, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    return json.dumps(value, separators=(",", ":")).encode()


def _failure(request: server.Request, code: int, message: str) -> bytes:
    return _json(request, {"error": message}, code)


def _arg(request: server.Request, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """``24h``, ``30m``, ``7d``, ``90s`` ago, or seconds since the epoch; ValueError otherwise."""
    match = _AGO.fullmatch(text.strip())
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"since={text!r}: give seconds since the epoch or an age like 30m, 24h, 7d") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"since={text!r} is not a time")
    return value


def _int(text: str | None, name: str, default: int, low: int, high: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a whole number") from None
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is outside {low}..{high}")
    return value


class Leaf(resource.Resource):
    """An endpoint that only reads: GET (and HEAD); any other method gets 405 and no HTML."""

    isLeaf = True

    def render(self, request: server.Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"405 Method Not Allowed: the dashboard only reads\n"
        return super().render(request)


class Folder(resource.Resource):
    """Children by name; a name it does not have gets a plain 404."""

    def getChild(self, path: bytes, request: server.Request) -> resource.IResource:
        return pages.notFound()


class Forbidden(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setResponseCode(403)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"403 Forbidden: open the address cmm dashboard printed, with its token\n"


class Guard(resource.Resource):
    """The root: checks every request before anything else sees it, and adds the safety headers."""

    def __init__(self, dashboard: Dashboard, inner: resource.Resource) -> None:
        super().__init__()
        self.dashboard = dashboard
        self.inner = inner

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.Resource:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if not self.dashboard.allows(request):
            return Forbidden()
        child: resource.Resource = self.inner.getChildWithDefault(path, request)
        return child

    def render(self, request: server.Request) -> bytes:
        return Forbidden().render(request)


class Page(Leaf):
    isLeaf = True

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self.dashboard = dashboard

    def render_GET(self, request: server.Request) -> object:
        try:
            period = store.parse_range(_arg(request, "range") or "hour")
        except ValueError as error:
            return _failure(request, 400, str(error))

        def render(panels: dict[str, Any]) -> bytes:
            nonce = secrets.token_urlsafe(16)
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
            request.setHeader(b"Content-Security-Policy", page.content_security_policy(nonce).encode())
            return page.render_page(token=self.dashboard.token, nonce=nonce, period=period, charts=panels["charts"],
                                    totals=panels["totals"], routes=panels["routes"],
                                    refresh=self.dashboard.refresh).encode()

        return _answer_later(request, self.dashboard.offload(lambda: build_panels(self.dashboard, period)), render)


def build_panels(dashboard: Dashboard, period: store.Range) -> dict[str, Any]:
    """The charts and totals of ``period``; an unreadable store gives empty charts and its reason."""
    now = dashboard.now()
    start, end = period.window(now)
    try:
        buckets, summary = dashboard.read(
            lambda db: (store.series(db, period, now, dashboard.series_cache), store.summary(db, start, end)))
        totals, routes = page.totals_html(summary), page.routes_html(summary)
    except store.StoreUnavailable as error:
        buckets = [store.Bucket(start + i * period.width) for i in range(period.buckets)]
        totals, routes = page.totals_html(None, str(error)), page.routes_html(None)
    return {"range": period.name, "charts": charts.usage_charts(buckets, period.width, dashboard.zone),
            "totals": totals, "routes": routes}


class JsonEndpoint(Leaf):
    """A GET answered with JSON; bad parameters get 400, an unreadable store 503, both with a reason."""

    isLeaf = True

    def __init__(self, dashboard: Dashboard, answer: Callable[[Dashboard, server.Request], object]) -> None:
        super().__init__()
        self.dashboard = dashboard
        self.answer = answer

    def render_GET(self, request: server.Request) -> object:
        found = self.dashboard.offload(lambda: self.answer(self.dashboard, request))
        return _answer_later(request, found, lambda value: _json(request, value))


def _answer_later(request: server.Request, found: defer.Deferred[Any], render: Callable[[Any], bytes]) -> object:
    """Finish ``request`` with ``render(result)`` once ``found`` fires; a bad parameter gets 400, an
    unreadable store 503, anything else 500 (and a logged traceback). Nothing is written to a
    request whose client has gone."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def failed(failure: Failure) -> bytes:
        if failure.check(ValueError):
            return _failure(request, 400, str(failure.value))
        if failure.check(store.StoreUnavailable):
            return _failure(request, 503, str(failure.value))
        log.err(failure, "dashboard request")
        return _failure(request, 500, "the dashboard failed to answer; see its output")

    def send(body: bytes) -> None:
        if not gone:
            request.write(body)
            request.finish()

    found.addCallback(render).addErrback(failed).addCallback(send).addErrback(log.err)
    return server.NOT_DONE_YET


def summary_answer(dashboard: Dashboard, request: server.Request) -> object:
    period = store.parse_range(_arg(request, "range") or "day")
    start, end = period.window(dashboard.now())
    summary: dict[str, Any] = dashboard.read(lambda db: store.summary(db, start, end))
    return {"range": period.name, **summary}


def requests_answer(dashboard: Dashboard, request: server.Request) -> object:
    limit = _int(_arg(request, "limit"), "limit", 100, 1, store.MAX_ROWS)
    after_text, since_text = _arg(request, "after"), _arg(request, "since")
    if after_text is not None:
        last = _int(after_text, "after", 0, 0, 2**63 - 1)
        rows = dashboard.read(lambda db: store.after(db, last, limit))
    elif since_text is not None:
        start = parse_since(since_text, dashboard.now())
        rows = dashboard.read(lambda db: store.since(db, start, limit))
    else:
        rows = dashboard.read(lambda db: store.latest(db, limit))
    return {"requests": rows}


def series_answer(dashboard: Dashboard, request: server.Request) -> object:
    period = store.parse_range(_arg(request, "range") or "hour")
    now = dashboard.now()
    buckets = dashboard.read(lambda db: store.series(db, period, now, dashboard.series_cache))
    return {"range": period.name, "width": period.width, "buckets": [attrs.asdict(b) for b in buckets]}


def panels_answer(dashboard: Dashboard, request: server.Request) -> object:
    return build_panels(dashboard, store.parse_range(_arg(request, "range") or "hour"))


class Status(Leaf):
    isLeaf = True

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self.dashboard = dashboard

    def render_GET(self, request: server.Request) -> object:
        def answer(found: dict[str, Any]) -> None:
            request.write(_json(request, found))
            request.finish()

        def failed(failure: Failure) -> None:
            log.err(failure, "dashboard status")
            request.write(_failure(request, 500, "the status could not be collected; see the dashboard's output"))
            request.finish()

        defer.ensureDeferred(self.dashboard.status()).addCallback(answer).addErrback(failed)
        return server.NOT_DONE_YET


def _event(kind: str, value: object, ident: int | None = None) -> bytes:
    head = f"event: {kind}\n" + (f"id: {ident}\n" if ident is not None else "")
    return (head + "data: " + json.dumps(value, separators=(",", ":")) + "\n\n").encode()


@attrs.define
class FeedStream:
    """One open event stream: new store rows as ``request`` events, the live counters as ``status``."""

    dashboard: Dashboard
    request: server.Request
    last_id: int | None  # None: start with the latest rows
    ticks: int = 0
    quiet_since: float = 0.0
    asking: bool = False
    loop: task.LoopingCall | None = None
    done: bool = False

    def start(self) -> None:
        clock = self.dashboard.reactor_clock()
        self.quiet_since = clock.seconds()
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = clock
        self.loop.start(FEED_INTERVAL, now=True).addErrback(log.err)
        self.request.notifyFinish().addBoth(self.stop)

    def stop(self, _: object = None) -> None:
        self.done = True
        if self.loop is not None and self.loop.running:
            self.loop.stop()

    def write(self, data: bytes) -> None:
        if not self.done:
            self.request.write(data)
            self.quiet_since = self.dashboard.reactor_clock().seconds()

    def tick(self) -> None:
        first = self.ticks == 0
        if self.ticks % STATUS_EVERY == 0 and not self.asking:
            self.asking = True
            defer.ensureDeferred(self.dashboard.status()).addCallback(self.send_status).addErrback(log.err)
        self.ticks += 1
        try:
            if self.last_id is None:
                rows = self.dashboard.read(lambda db: store.latest(db, BACKLOG))
            else:
                last = self.last_id
                rows = self.dashboard.read(lambda db: store.after(db, last))
        except store.StoreUnavailable:
            rows = []  # the status events say why
        if rows:
            self.last_id = rows[-1]["id"]
        elif self.last_id is None and self.dashboard.store_health()["ok"]:
            self.last_id = 0  # an empty store: from now on, every row is new
        for row in rows:
            self.write(_event("request", row, row["id"]))
        if first:
            self.write(_event("ready", {"last_id": self.last_id}))
        elif self.dashboard.reactor_clock().seconds() - self.quiet_since >= KEEPALIVE:
            self.write(b": keep-alive\n\n")

    def send_status(self, found: dict[str, Any]) -> None:
        self.asking = False
        self.write(_event("status", found))


class Feed(Leaf):
    """Server-sent events; a reconnecting EventSource's ``Last-Event-ID`` resumes where it stopped."""

    isLeaf = True

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self.dashboard = dashboard

    def render_HEAD(self, request: server.Request) -> bytes:
        """The headers only: no stream is started for a request that cannot read one."""
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        return b""

    def render_GET(self, request: server.Request) -> object:
        resume = (request.getHeader(b"last-event-id") or b"").decode("ascii", "replace") or _arg(request, "after")
        try:
            last_id = None if resume is None else _int(resume, "after", 0, 0, 2**63 - 1)
        except ValueError as error:
            return _failure(request, 400, str(error))
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.write(b"retry: 2000\n\n")
        FeedStream(self.dashboard, request, last_id).start()
        return server.NOT_DONE_YET


def resource_tree(dashboard: Dashboard) -> resource.Resource:
    """Every page and endpoint, behind the :class:`Guard`."""
    inner = Folder()
    inner.putChild(b"", Page(dashboard))
    api = Folder()
    inner.putChild(b"api", api)
    api.putChild(b"summary", JsonEndpoint(dashboard, summary_answer))
    api.putChild(b"requests", JsonEndpoint(dashboard, requests_answer))
    api.putChild(b"series", JsonEndpoint(dashboard, series_answer))
    api.putChild(b"panels", JsonEndpoint(dashboard, panels_answer))
    api.putChild(b"status", Status(dashboard))
    api.putChild(b"feed", Feed(dashboard))
    return Guard(dashboard, inner)


class QuietSite(server.Site):
    """No access log: every URL holds the token."""

    def log(self, request: HTTPRequest) -> None:
        pass


def site(dashboard: Dashboard) -> server.Site:
    return QuietSite(resource_tree(dashboard))
