-- wrk script: a burst of JobRequests on POST /jobs (the forge), each thread stopping after
-- its share, results as one JSON line.
--
-- A Python submitter costs the shared CPUs about 0.3 to 1.3 ms per job, as much as a
-- tenth of what the forge and the runners need; wrk's share is a small fraction of that, so
-- the burst measures the forge and its runners rather than the load generator.
--
--   wrk -t2 -c8 -d600s -s bench/wrk_submit.lua http://127.0.0.1:PORT -- NONCE PER_THREAD
--
-- Job ids are uuids that start with the run's nonce (8 hex digits), so the run's jobs can be
-- told apart from earlier ones when they are read back. Each request's
-- ``metadata.createdAt`` is the wall clock (milliseconds, gettimeofday through LuaJIT's FFI)
-- when wrk built it: the submit time that submit → completed latency is measured from.
-- A thread stops once it has its share of answers and prints BENCH_THREAD_DONE; requests
-- already sent on its other connections still reach the forge, so a run submits its total
-- or a few more.
--
-- done() prints "BENCH_JSON {...}": requests answered, duration, socket errors and every
-- status other than 202 with its count.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_usec; } bench_timeval;
int gettimeofday(bench_timeval *tv, void *tz);
]]
local tv = ffi.new("bench_timeval")

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(here .. "wrk_common.lua")
setup = common.setup

function init(args)
   nonce = tonumber(args[1]) or 0
   share = tonumber(args[2]) or 1000
   counter = 0
   answered = 0
   statuses = {}
   math.randomseed(nonce + tid * 7919)
end

local function now_z()
   ffi.C.gettimeofday(tv, nil)
   local seconds = tonumber(tv.tv_sec)
   return string.format(
      "%s.%03dZ", os.date("!%Y-%m-%dT%H:%M:%S", seconds), math.floor(tonumber(tv.tv_usec) / 1000)
   )
end

function request()
   counter = counter + 1
   local id = common.uuid(nonce, tid, counter)
   local correlation = common.uuid(nonce, tid + 32768, counter)
   local body = '{"id":"' .. id .. '","type":"bench.echo","priority":50,'
      .. '"payload":{"type":"bench.echo","version":"1.0.0","data":{"text":"hello"}},'
      .. '"metadata":{"source":"bench","createdAt":"' .. now_z() .. '",'
      .. '"correlationId":"' .. correlation .. '"},"timeoutMs":5000}'
   return wrk.format("POST", "/jobs", {["Content-Type"] = "application/json"}, body)
end

function response(status, headers, body)
   answered = answered + 1
   common.count(statuses, status, 202)
   if answered == share then
      -- wrk itself runs for its whole -d; the caller interrupts it (SIGINT) once every
      -- thread has said this, and wrk then reports as usual.
      io.write("BENCH_THREAD_DONE\n")
      io.flush()
      wrk.thread:stop()
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"non202":{%s},"socket_errors":%d}\n',
      summary.requests, summary.duration, common.statuses_json(),
      e.connect + e.read + e.write + e.timeout
   ))
end
