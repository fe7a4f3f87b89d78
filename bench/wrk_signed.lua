-- wrk script: POST /execute with requests signed beforehand, results as one JSON line.
--
-- A signed request may be sent once (the runner refuses a replayed signature) and carries a
-- fresh jobId, and wrk's Lua has no HMAC: bench/http_bench.py writes the requests, signed
-- with the runner's secret, one per line ("<signature>\t<timestamp>\t<event id>\t<body>"),
-- and each wrk thread sends every N-th of them (N = wrk's thread count), in order.
--
--   wrk -t2 -c16 -d5s -s bench/wrk_signed.lua http://127.0.0.1:PORT -- FILE THREADS
--
-- done() prints the same "BENCH_JSON {...}" as wrk_execute.lua (common.report_execute); a thread that runs out of
-- requests sends its last one again (counted as the replay it is: a non-200).

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "wrk_common.lua")
setup = common.setup

function init(args)
   local threads = tonumber(args[2]) or 1
   statuses = {}
   requests = {}
   local index = 0
   for line in io.lines(args[1]) do
      if index % threads == tid then
         local signature, stamp, event, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
         table.insert(requests, wrk.format("POST", "/execute", {
            ["Content-Type"] = "application/json",
            ["x-webhook-signature"] = signature,
            ["x-webhook-timestamp"] = stamp,
            ["x-webhook-event-id"] = event,
         }, body))
      end
      index = index + 1
   end
   next_request = 0
end

function request()
   if next_request < #requests then
      next_request = next_request + 1
   end
   return requests[next_request]
end

function response(status, headers, body)
   common.count(statuses, status, 200)
end

function done(summary, latency, requests)
   common.report_execute(summary, latency)
end
