-- Clear one map index of a task, or every map index of it, atomically, and tell change
-- streams (publishing in the same script, so no clear goes unannounced).
--
-- mode "one": KEYS[1] registry hash, KEYS[2] the caller's scope hash, KEYS[3] its
--             expiry zset; ARGV: "one", scope key base, map_index, channel
-- mode "all": KEYS[1] registry hash; ARGV: "all", channel
-- An empty channel publishes nothing.
--
-- The registry lists the map indices holding state as "m<map_index>", each valued the
-- task's generation it was written in plus one, besides "g" (the task's generation,
-- absent: 0) and the readable dag_id / run_id / task_id and, when known, dag_run_id.
--
-- Clear-all is one HINCRBY of "g" (issue 15 item 7): every scope written in an older
-- generation is stale from then on and reads as empty everywhere (the gateway reads the
-- registry before the scope, lua/bulk_read.lua checks it in its script); a write to a
-- stale scope unlinks it first (lua/task_write.lua); the sweeper reclaims the rest in
-- bounded steps (lua/task_reclaim.lua). So the clear is O(1) however many map indices
-- the task has, never races a writer adding one, and touches only its declared key: on a
-- Cluster slot in mid-migration it runs wherever the registry is, like any one-key write.
-- It returns the new generation, or 0 when no map index held state (nothing to reclaim;
-- a registry that does not exist is not created).
local registry, mode = KEYS[1], ARGV[1]

-- Fields that are no map index: the identity, and the generation once there is one.
local function identity_fields()
  return 3 + redis.call('HEXISTS', registry, 'dag_run_id') + redis.call('HEXISTS', registry, 'g')
end

if mode == 'all' then
  local generation = 0
  if redis.call('HLEN', registry) > identity_fields() then
    generation = redis.call('HINCRBY', registry, 'g', 1)
  end
  if ARGV[2] ~= '' then
    redis.call('PUBLISH', ARGV[2], 'c:')
  end
  return generation
end

redis.call('UNLINK', KEYS[2], KEYS[3])
redis.call('HDEL', registry, 'm' .. ARGV[3])
-- No scope holds data, stale or not: the generation may start over with a new registry.
if redis.call('HLEN', registry) <= identity_fields() then
  redis.call('UNLINK', registry)
end
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[4], 'c' .. ARGV[3] .. ':')
end
return 1
