-- Shared by bench/wrk_execute.lua, wrk_signed.lua and wrk_submit.lua (each loads it with dofile):
-- wrk's threads, each with its own count of unexpected statuses, and the JSON of their sum.

local common = {threads = {}}

-- wrk's setup(): number the thread and keep it, so done() can read its counts.
function common.setup(thread)
   thread:set("tid", #common.threads)
   table.insert(common.threads, thread)
end

-- A uuid (version-4 layout) unique to the run (``nonce``), the thread (``tid``) and the
-- thread's ``counter``: the jobs of one run never repeat an id, nor meet an earlier run's.
function common.uuid(nonce, tid, counter)
   return string.format(
      "%08x-%04x-4%03x-%04x-%012x",
      nonce, tid, math.random(0, 4095), 32768 + math.random(0, 16383), counter
   )
end

-- Count ``status`` in the thread's ``statuses`` table unless it is the ``expected`` one.
function common.count(statuses, status, expected)
   if status ~= expected then
      local key = tostring(status)
      statuses[key] = (statuses[key] or 0) + 1
   end
end

-- The unexpected statuses of every thread, summed, as the inside of a JSON object.
function common.statuses_json()
   local other = {}
   for _, thread in ipairs(common.threads) do
      local counts = thread:get("statuses")
      for status, count in pairs(counts) do
         other[status] = (other[status] or 0) + count
      end
   end
   local parts = {}
   for status, count in pairs(other) do
      table.insert(parts, string.format('"%s":%d', status, count))
   end
   return table.concat(parts, ",")
end

-- done() of the /execute scripts: one "BENCH_JSON {...}" line (requests, duration, every
-- status but 200, socket errors, timeouts and latency percentiles) for bench/http_bench.py.
function common.report_execute(summary, latency)
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

return common
