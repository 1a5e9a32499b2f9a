-- wrk script: GET /mcp/<server> (the MCP endpoint), rotating the gateway key per request.
--
-- GET, not a POSTed tools/call: these configurations answer with a direct_response, and Envoy
-- closes an HTTP/1.1 connection after a local reply to a request with a body (measured: one
-- connection per request), which would measure TCP set-up instead of auth. Configuration D
-- sends real POSTed tools/call requests to a real upstream.
--
--   [WRK_DELAY_MS=N] wrk -s benchmarks/lua/keys.lua URL -- KEYS_FILE [PATH]
--
-- KEYS_FILE has one key a line, sent as `Authorization: Bearer <key>`. Each wrk thread starts
-- at a different offset and walks the list, so every key is used. Requests are prebuilt once.
-- WRK_DELAY_MS (optional, environment) paces each connection with wrk's delay(): a crude rate
-- cap for background load, not a fixed-rate latency measurement (that is h2load's job). It is
-- read at load time because wrk decides whether the script has delay() before init() runs.
-- done() prints one JSON line, prefixed "WRK_JSON ", that the harness parses.

local requests = {}
local n = 0
local i = 0
local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "0")
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)  -- a global in the thread's own Lua state
end

function init(args)
  local path = args[2] or "/mcp/bench"
  for key in io.lines(args[1]) do
    if #key > 0 then
      n = n + 1
      requests[n] = wrk.format("GET", path, {
        ["Authorization"] = "Bearer " .. key,
        ["Accept"] = "application/json, text/event-stream",
      })
    end
  end
  i = ((tid or 1) * 7919) % n
end

function request()
  i = i % n + 1
  return requests[i]
end

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

function done(summary, latency, requests_)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
