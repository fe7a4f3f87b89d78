-- wrk script: POST /execute with a fresh jobId per request, results as one JSON line.
--
-- runnerkit's idempotency ledger replays a repeated jobId, so every request must carry a
-- unique uuid. It is built here from a per-run nonce (wrk argument 1), the wrk thread's
-- number and a per-thread counter, so ids never repeat within a run or across runs.
--
--   wrk -t2 -c16 -d5s -s bench/wrk_execute.lua http://127.0.0.1:PORT -- NONCE
--
-- done() prints "BENCH_JSON {...}": requests, duration, socket errors, every non-200 status
-- with its count, and latency percentiles in microseconds.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "wrk_common.lua")
setup = common.setup

function init(args)
   nonce = tonumber(args[1]) or 0
   counter = 0
   statuses = {}
   math.randomseed(nonce + tid * 7919)
end

function request()
   counter = counter + 1
   local id = common.uuid(nonce, tid, counter)
   local body = '{"jobId":"' .. id .. '","moduleId":"bench","capabilityId":"echo",'
      .. '"payload":{"text":"hello"},"timeoutMs":5000}'
   return wrk.format("POST", "/execute", {["Content-Type"] = "application/json"}, body)
end

function response(status, headers, body)
   common.count(statuses, status, 200)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"non200":{%s},'
         .. '"socket_errors":%d,"timeouts":%d,'
         .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, common.statuses_json(),
      e.connect + e.read + e.write, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean
   ))
end
