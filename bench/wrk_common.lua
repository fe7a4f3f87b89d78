-- Shared by bench/wrk_execute.lua and bench/wrk_submit.lua (each loads it with dofile):
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

return common
