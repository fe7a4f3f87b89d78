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
   common.report_execute(summary, latency)
end
