-- Reclaims stale scopes of a task after clear-alls (lua/task_clear.lua), a bounded batch
-- at a time: the sweeper finds candidates by HSCAN of the registry and names every key
-- here, so the script stays in one Cluster slot with all its keys declared.
--
-- KEYS[1] the task's registry hash; KEYS[2i], KEYS[2i+1] the scope hash and expiry zset
-- of the map index ARGV[i] names
-- ARGV[i] a registry field "m<map_index>" the sweeper saw stale
-- Returns the scopes reclaimed.
--
-- Staleness is checked again here, atomically with the delete: a write since the scan
-- moved the field on to the current generation, and a registry deleted and created again
-- since then starts at generation 0, where nothing is stale. Once only the identity (and
-- "g") is left, no scope holds data, so the registry goes, and the generation with it.
local registry = KEYS[1]
local generation = tonumber(redis.call('HGET', registry, 'g') or '0')
local reclaimed = 0
for i = 1, #ARGV do
  local written_in = redis.call('HGET', registry, ARGV[i])
  if written_in and tonumber(written_in) <= generation then
    redis.call('UNLINK', KEYS[2 * i], KEYS[2 * i + 1])
    redis.call('HDEL', registry, ARGV[i])
    reclaimed = reclaimed + 1
  end
end
if reclaimed > 0 and redis.call('HLEN', registry) <= 3
    + redis.call('HEXISTS', registry, 'dag_run_id') + redis.call('HEXISTS', registry, 'g') then
  redis.call('UNLINK', registry)
end
return reclaimed
