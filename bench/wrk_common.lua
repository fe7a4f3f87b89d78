-- Shared by bench/wrk_execute.lua and bench/wrk_submit.lua (each loads it with dofile):
-- wrk's threads, each with its own count of unexpected statuses, and the JSON of their sum.

local common = {threads = {}}

-- wrk's setup(): number the thread and keep it, so done() can read its counts.
function common.setup(thread)
   thread:set("tid", #common.threads)
   table.insert(common.threads, thread)
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
