-- Reads many fields of one hash unless together they are larger than a limit. The sizes
-- are checked (HSTRLEN, which reads no value) in the same atomic step as the read, so
-- Redis never sends, and the gateway never buffers, more than the limit.
--
-- KEYS[1] a task scope hash or an asset values hash
-- ARGV[1] the most bytes the stored values may total; ARGV[2..] the fields
-- Returns {total} when over the limit (nothing read), else {total, value or false, ...}
-- in the order asked. One HGET per field rather than one HMGET: `unpack` of more than a
-- few thousand fields overflows Lua's stack.
local hash, limit = KEYS[1], tonumber(ARGV[1])
local total = 0
for i = 2, #ARGV do
  total = total + redis.call('HSTRLEN', hash, ARGV[i])
end
if total > limit then
  return {total}
end
local reply = {total}
for i = 2, #ARGV do
  reply[i] = redis.call('HGET', hash, ARGV[i])
end
return reply
