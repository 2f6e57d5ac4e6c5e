-- wrk script: keep-alive POSTs of one fixed body, like Claude Code's, then a JSON summary.
--
-- run.py passes the body and an optional Host header in the environment so that one script
-- serves every route; done() prints one line "CMM_BENCH_RESULT {...}" that run.py parses,
-- which is sturdier than scraping wrk's human-readable report. CMM_BENCH_CLOSE=1 sends
-- "Connection: close" on every request: a new (TLS) connection per request.

wrk.method = "POST"
wrk.body = os.getenv("CMM_BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.headers["anthropic-beta"] = "interleaved-thinking-2025-05-14"
wrk.headers["x-api-key"] = "sk-ant-bench-0000000000000000"
wrk.headers["User-Agent"] = "claude-cli/2.1.330 (external, cli)"
wrk.headers["x-app"] = "cli"
local host = os.getenv("CMM_BENCH_HOST")
if host and host ~= "" then
   wrk.headers["Host"] = host
end
if os.getenv("CMM_BENCH_CLOSE") == "1" then
   wrk.headers["Connection"] = "close"
end

function done(summary, latency, requests)
   local e = summary.errors
   local p = {}
   for _, q in ipairs({50, 90, 99}) do
      p[#p + 1] = string.format('"%d":%d', q, latency:percentile(q))
   end
   io.write(string.format(
      'CMM_BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"percentiles":{%s}}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.max, table.concat(p, ",")))
end

-- CMM_BENCH_DELAY_MS: each connection pauses that long before each request, to pace the rate
-- (Debian's wrk has no -R). wrk takes whole milliseconds, so a fractional pause is rounded up
-- or down at random in proportion: on average it is the one asked for.
local pause = tonumber(os.getenv("CMM_BENCH_DELAY_MS") or "")
if pause and pause > 0 then
   function delay()
      local whole = math.floor(pause)
      if math.random() < pause - whole then
         return whole + 1
      end
      return whole
   end
end
