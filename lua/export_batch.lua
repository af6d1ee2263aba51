-- Reads the next fields of one hash for `airstate export`, as many as fit a byte budget.
-- The sizes are checked (HSTRLEN, which reads no value) in the same atomic step as the
-- read, so Redis never sends, and the exporter never buffers, much more than the budget,
-- however large the scope; the first field is read whatever its size, so a value of any
-- size the API accepted still exports.
--
-- KEYS[1] a task scope hash or an asset values hash
-- KEYS[2] (assets only) the asset's writers hash
-- ARGV[1] the most bytes the values read may total (the first field always is read)
-- ARGV[2..] the fields, in the order to read them
-- Returns {n, value_1, writer_1, ..., value_n, writer_n}: the first n fields, a value or
-- writer false when missing (deleted since the exporter listed the field names; always
-- false without KEYS[2]).
local hash, writers, limit = KEYS[1], KEYS[2], tonumber(ARGV[1])
local total, reply = 0, {0}
for i = 2, #ARGV do
  local size = redis.call('HSTRLEN', hash, ARGV[i])
  if i > 2 and total + size > limit then
    break
  end
  total = total + size
  reply[1] = i - 1
  reply[#reply + 1] = redis.call('HGET', hash, ARGV[i])
  if writers then
    reply[#reply + 1] = redis.call('HGET', writers, ARGV[i])
  else
    reply[#reply + 1] = false
  end
end
return reply
