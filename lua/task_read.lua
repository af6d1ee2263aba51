-- Reads one key of a task scope, unless a clear-all left the scope stale
-- (lua/task_clear.lua): the registry's "g" and the scope's "m<map_index>" are checked in
-- the same atomic step as the read.
--
-- KEYS[1] the task scope hash, KEYS[2] the task's registry hash
-- ARGV[1] the state key, ARGV[2] the scope's registry field "m<map_index>"
-- Returns the stored value, or false when it is missing or its scope is stale.
--
-- One script rather than a pipeline of HMGET and HGET: the gateway's cost is per
-- command (callgrind: a GET took 122k instructions with the pipeline, 27k more than with
-- one HGET), while Redis's extra cost for the script is about 2 µs a call and 5 % of its
-- request rate under redis-benchmark (BENCHMARKS.md). The scope written in a generation
-- at most "g" is stale; no "m" field hides nothing.
local marks = redis.call('HMGET', KEYS[2], 'g', ARGV[2])
local written_in = marks[2] and tonumber(marks[2])
if written_in and written_in <= (tonumber(marks[1] or '0') or 0) then
  return false
end
return redis.call('HGET', KEYS[1], ARGV[1])
