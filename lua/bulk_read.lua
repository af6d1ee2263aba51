-- Reads many fields of one hash unless together they are larger than a limit. The sizes
-- are checked (HSTRLEN, which reads no value) in the same atomic step as the read, so
-- Redis never sends, and the gateway never buffers, more than the limit.
--
-- KEYS[1] a task scope hash or an asset values hash; KEYS[2], for a task scope only, the
-- task's registry hash
-- ARGV[1] the most bytes the stored values may total; ARGV[2] the scope's registry field
-- "m<map_index>" ("" without KEYS[2]); ARGV[3..] the fields
-- Returns {total} when over the limit (nothing read), else {total, value or false, ...}
-- in the order asked. One HGET per field rather than one HMGET: `unpack` of more than a
-- few thousand fields overflows Lua's stack.
--
-- A task scope written in a generation older than the registry's "g" was cleared by a
-- clear-all (lua/task_clear.lua) and reads as empty: {0, false, ...}.
local hash, limit = KEYS[1], tonumber(ARGV[1])
if KEYS[2] then
  local marks = redis.call('HMGET', KEYS[2], ARGV[2], 'g')
  if marks[1] and tonumber(marks[1]) <= tonumber(marks[2] or '0') then
    local empty = {0}
    for i = 3, #ARGV do
      empty[i - 1] = false
    end
    return empty
  end
end
local total = 0
for i = 3, #ARGV do
  total = total + redis.call('HSTRLEN', hash, ARGV[i])
end
if total > limit then
  return {total}
end
local reply = {total}
for i = 3, #ARGV do
  reply[i - 1] = redis.call('HGET', hash, ARGV[i])
end
return reply
