"""The dashboard's one page and its fragments, as text: values in, HTML out, no I/O.

Self-contained: its style and script are inline, allowed by the nonce of the page's
Content-Security-Policy and nothing else, so the page loads nothing from anywhere. The script only
ever puts request data in the page as text (``textContent``); the markup it swaps in (charts,
totals) is what :mod:`cmm.dashboard.charts` and :func:`totals_html` made, escaped here.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any
from urllib.parse import urlencode

from cmm.dashboard.charts import number
from cmm.dashboard.store import RANGES, Range

RANGE_TITLES = {"hour": "Last hour", "day": "Last day", "week": "Last week"}
BUCKET_WORDS = {"hour": "per minute", "day": "per 30 minutes", "week": "per 3 hours"}


def content_security_policy(nonce: str) -> str:
    """Only this page's own inline style and script, and requests back to this server."""
    return (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f} %"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def totals_html(summary: Mapping[str, Any] | None, problem: str | None = None) -> str:
    """The period's totals, from :func:`cmm.dashboard.store.summary`."""
    if summary is None:
        return f'<p class="note">{escape(problem or "No usage store.")}</p>'
    figures = (
        ("Requests", number(summary["requests"])),
        ("Failed", number(summary["errors"])),
        ("Input tokens", number(summary["input_tokens"])),
        ("Output tokens", number(summary["output_tokens"])),
        ("Cache hit rate", _percent(summary["cache_hit_rate"])),
        ("Latency p50", _ms(summary["p50_ms"])),
        ("Latency p99", _ms(summary["p99_ms"])),
    )
    parts = ['<dl class="figures">']
    parts += [f"<div><dt>{escape(name)}</dt><dd>{escape(value)}</dd></div>" for name, value in figures]
    parts.append("</dl>")
    return "".join(parts)


def routes_html(summary: Mapping[str, Any] | None) -> str:
    """A row per route and rule of the period, from :func:`cmm.dashboard.store.summary`."""
    if summary is None:
        return ""
    if not summary["routes"]:
        return '<p class="note">No requests in this period.</p>'
    parts = ['<div class="scroll" role="region" aria-label="Totals per route" tabindex="0"><table>'
             "<caption>Per route and rule</caption><thead><tr>"
             '<th scope="col">Route</th><th scope="col">Rule</th><th scope="col" class="n">Requests</th>'
             '<th scope="col" class="n">Failed</th><th scope="col" class="n">Input</th>'
             '<th scope="col" class="n">Output</th><th scope="col" class="n">Cache read</th>'
             '<th scope="col" class="n">Cache write</th></tr></thead><tbody>']
    for route in summary["routes"]:
        cells = [route["requests"], route["errors"], route["input_tokens"], route["output_tokens"],
                 route["cache_read_input_tokens"], route["cache_creation_input_tokens"]]
        parts.append(f'<tr><th scope="row">{escape(str(route["route"]))}</th><td>{escape(str(route["rule"] or "–"))}</td>'
                     + "".join(f'<td class="n">{escape(number(v))}</td>' for v in cells) + "</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def render_page(*, token: str, nonce: str, period: Range, charts: Mapping[str, str], totals: str, routes: str,
                refresh: float = 30.0) -> str:
    """The whole page for ``period``; the script reads the token from the page's own address and
    redraws the charts and totals every ``refresh`` seconds."""
    links = []
    for name in RANGES:
        href = escape("?" + urlencode({"token": token, "range": name}))
        current = ' aria-current="page"' if name == period.name else ""
        links.append(f'<li><a href="{href}"{current}>{escape(RANGE_TITLES[name])}</a></li>')
    title = RANGE_TITLES[period.name]
    per = BUCKET_WORDS[period.name]
    figures = "".join(
        f'<figure id="fig-{key}">{charts[key]}<figcaption>{escape(caption)}, {escape(per)}</figcaption></figure>'
        for key, caption in (("requests", "Requests"), ("tokens", "Tokens"), ("latency", "Latency (p50 and p95)")))
    return _PAGE.format(
        nonce=escape(nonce), style=_STYLE, script=_SCRIPT, range=escape(period.name), links="".join(links),
        title=escape(title), figures=figures, totals=totals, routes=routes, refresh=f"{refresh:g}")


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>cmm dashboard</title>
<link rel="icon" href="data:,">
<style nonce="{nonce}">{style}</style>
</head>
<body data-range="{range}" data-refresh="{refresh}">
<a class="skip" href="#feed-heading">Skip to the request feed</a>
<header>
<h1>cmm dashboard</h1>
<p id="running" role="status">Asking cmm for its counters…</p>
<nav aria-label="Period">
<ul>{links}</ul>
</nav>
</header>
<main>
<section aria-labelledby="totals-heading">
<h2 id="totals-heading">{title}</h2>
<div id="totals">{totals}</div>
<div class="charts">{figures}</div>
<div id="routes">{routes}</div>
</section>
<section aria-labelledby="live-heading">
<h2 id="live-heading">Live counters since cmm started</h2>
<div class="scroll" role="region" aria-label="Live counters" tabindex="0">
<table id="live">
<caption>Requests per route, from the running cmm</caption>
<thead><tr><th scope="col">Route</th><th scope="col" class="n">Requests</th><th scope="col" class="n">Failed</th>
<th scope="col" class="n">p50</th><th scope="col" class="n">p99</th><th scope="col" class="n">Sent</th>
<th scope="col" class="n">Received</th></tr></thead>
<tbody></tbody>
</table>
</div>
</section>
<section aria-labelledby="feed-heading">
<h2 id="feed-heading" tabindex="-1">Requests as they happen</h2>
<p id="feed-state" class="note">Connecting…</p>
<div class="scroll" role="region" aria-label="Request feed" tabindex="0">
<table id="feed">
<caption>Latest requests, newest first</caption>
<thead><tr><th scope="col">Time</th><th scope="col">Model</th><th scope="col">Route</th><th scope="col">Served by</th>
<th scope="col" class="n">Status</th><th scope="col" class="n">Duration</th><th scope="col" class="n">Tokens in</th>
<th scope="col" class="n">Tokens out</th></tr></thead>
<tbody aria-live="off" aria-relevant="additions"></tbody>
</table>
</div>
</section>
</main>
<footer><p>Served by <code>cmm dashboard</code> on this computer only; the data: the usage store and the
running cmm. JSON for other tools: <code>/api/summary</code>, <code>/api/requests</code>, <code>/api/series</code>,
<code>/api/status</code>, <code>/api/feed</code> (each with this page's token).</p></footer>
<script nonce="{nonce}">{script}</script>
</body>
</html>
"""

_STYLE = """
:root { color-scheme: light dark; --fg: #1b1f24; --bg: #ffffff; --muted: #57606a; --line: #d0d7de;
  --panel: #f6f8fa; --bad: #b42318; --focus: #0072B2; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6edf3; --bg: #0d1117; --muted: #9da7b3; --line: #30363d; --panel: #161b22; --bad: #ff7b72;
    --focus: #56B4E9; }
}
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1280px; padding: 0 1rem 2rem; font: 14px/1.4 system-ui, -apple-system,
  "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
h1 { font-size: 1.4rem; margin: 0.75rem 0 0.25rem; }
h2 { font-size: 1.1rem; margin: 1rem 0 0.5rem; }
a { color: var(--focus); }
a:focus-visible, [tabindex]:focus-visible { outline: 3px solid var(--focus); outline-offset: 2px; }
.skip { position: absolute; left: -999px; }
.skip:focus { left: 1rem; top: 0.5rem; background: var(--bg); padding: 0.25rem 0.5rem; }
header { display: flex; flex-wrap: wrap; align-items: center; gap: 0.25rem 1.5rem; }
header nav { margin-left: auto; }
#running { margin: 0; color: var(--muted); }
#running.down { color: var(--bad); font-weight: 600; }
nav ul { display: flex; flex-wrap: wrap; gap: 0.5rem; list-style: none; padding: 0; margin: 0.5rem 0; }
nav a { display: inline-block; padding: 0.35rem 0.9rem; border: 1px solid var(--line); border-radius: 999px;
  text-decoration: none; }
nav a[aria-current="page"] { background: var(--focus); border-color: var(--focus); color: var(--bg); font-weight: 600; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
caption { text-align: left; color: var(--muted); padding: 0.25rem 0; }
th, td { padding: 0.3rem 0.5rem; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
thead th { background: var(--panel); }
#feed td:nth-child(3), #feed td:nth-child(4), #live th[scope="row"], #routes td:nth-child(2) {
  white-space: normal; overflow-wrap: anywhere; }  /* rule labels are long: wrap them, not the numbers */
.n { text-align: right; }
tr.failed td, tr.failed th { color: var(--bad); }
.note { color: var(--muted); }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(8.5rem, 1fr)); gap: 0.5rem; margin: 0 0 0.75rem; }
.figures div { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 0.4rem 0.6rem; }
.figures dt { color: var(--muted); font-size: 0.85rem; }
.figures dd { margin: 0; font-size: 1.15rem; font-weight: 600; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 340px), 1fr)); gap: 0.75rem; }
figure { margin: 0; background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: 0.5rem; }
figcaption { color: var(--muted); font-size: 0.9rem; }
svg.chart { width: 100%; height: auto; display: block; }
footer { margin-top: 2rem; color: var(--muted); font-size: 0.85rem; }
@media (max-width: 600px) { body { padding: 0 0.5rem 1rem; } th, td { padding: 0.25rem 0.35rem; } }
"""

_SCRIPT = """
"use strict";
(function () {
  const token = new URLSearchParams(location.search).get("token") || "";
  const range = document.body.dataset.range;
  const query = (extra) => "?" + new URLSearchParams(Object.assign({token: token}, extra)).toString();
  const feed = document.querySelector("#feed tbody");
  const feedState = document.getElementById("feed-state");
  const running = document.getElementById("running");
  const live = document.querySelector("#live tbody");
  const MAX_ROWS = 200;

  const dash = "\\u2013";
  const count = (n) => n == null ? dash : Number(n).toLocaleString();
  const millis = (ms) => ms == null ? dash : (ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : Math.round(ms) + " ms");
  const bytes = (n) => {
    if (!n) return "0 B";
    const units = ["B", "kB", "MB", "GB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  };

  function row(cells, failed) {
    const tr = document.createElement("tr");
    if (failed) tr.className = "failed";
    cells.forEach(([text, numeric], i) => {
      const cell = document.createElement(i === 0 ? "th" : "td");
      if (i === 0) cell.scope = "row";
      if (numeric) cell.className = "n";
      cell.textContent = text;
      tr.appendChild(cell);
    });
    return tr;
  }

  function addRequest(r) {
    const failed = r.status == null || r.status >= 400 || r.error != null;
    let status = r.status == null ? dash : String(r.status);
    if (r.error) status += " (" + r.error + ")";
    const route = r.route + (r.rule ? " \\u00b7 " + r.rule : "") + (r.fallback ? " (" + r.fallback + ")" : "");
    const served = [r.served_model, r.upstream].filter(Boolean).join(" @ ");
    const tr = row([
      [new Date(r.time * 1000).toLocaleTimeString()],
      [r.model || (r.method + " " + r.path)],
      [route],
      [served || dash],
      [status, true],
      [millis(r.duration * 1000), true],
      [count((r.input_tokens || 0) + (r.cache_read_input_tokens || 0) + (r.cache_creation_input_tokens || 0)), true],
      [count(r.output_tokens), true],
    ], failed);
    tr.dataset.id = String(r.id);
    feed.insertBefore(tr, feed.firstChild);
    while (feed.rows.length > MAX_ROWS) feed.deleteRow(-1);
  }

  function showStatus(s) {
    const cmm = s.cmm || {};
    running.classList.toggle("down", !cmm.running);
    const said = cmm.running
      ? "cmm is running" + (cmm.pid ? " (pid " + cmm.pid + ")" : "")
      : "cmm is not running" + (cmm.note ? ": " + cmm.note : "");
    if (running.textContent !== said) running.textContent = said;  // a status region: speak changes only
    live.replaceChildren();
    const routes = cmm.routes || [];
    if (!routes.length) {
      const tr = row([[cmm.running ? "No requests since cmm started" : "No live counters while cmm is not running"]]);
      tr.firstChild.colSpan = 7;
      live.appendChild(tr);
    }
    routes.forEach((r) => live.appendChild(row([
      [r.route], [count(r.requests), true], [count(r.errors), true], [millis(r.p50_ms), true],
      [millis(r.p99_ms), true], [bytes(r.bytes_in), true], [bytes(r.bytes_out), true],
    ], false)));
    if (s.store && !s.store.ok) feedState.textContent = s.store.detail;
  }

  const source = new EventSource("/api/feed" + query({}));
  source.addEventListener("request", (e) => addRequest(JSON.parse(e.data)));
  source.addEventListener("status", (e) => showStatus(JSON.parse(e.data)));
  source.addEventListener("ready", () => {
    feedState.textContent = "Live: new requests appear at the top.";
    feed.setAttribute("aria-live", "polite");
  });
  source.addEventListener("error", () => { feedState.textContent = "Connection lost; reconnecting\\u2026"; });

  async function refreshPanels() {
    try {
      const answer = await fetch("/api/panels" + query({range: range}), {cache: "no-store"});
      if (!answer.ok) return;
      const panels = await answer.json();
      document.getElementById("totals").innerHTML = panels.totals;
      document.getElementById("routes").innerHTML = panels.routes;
      for (const [key, svg] of Object.entries(panels.charts)) {
        const figure = document.getElementById("fig-" + key);
        const old = figure && figure.querySelector("svg");
        if (old) old.outerHTML = svg;
      }
    } catch (error) {
      feedState.textContent = "Could not refresh the charts; retrying.";
    }
  }
  setInterval(refreshPanels, 1000 * (Number(document.body.dataset.refresh) || 30));
})();
"""
