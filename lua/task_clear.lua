-- Clear one map index of a task, or every map index of it, atomically, and tell change
-- streams (publishing in the same script, so no clear goes unannounced).
--
-- mode "one": KEYS[1] registry hash, KEYS[2] the caller's scope hash, KEYS[3] its
--             expiry zset; ARGV: "one", scope key base, map_index, channel
-- mode "all": KEYS[1] registry hash; ARGV: "all", channel
-- mode "unlink": KEYS[1] registry hash, KEYS[2] / KEYS[3] the caller's own scope hash and
--             expiry zset; ARGV: "unlink", scope key base ("<prefix>{t:<digest>}:"), channel
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
--
-- Clear-all "unlink" (AIRSTATE_CLEAR_ALL=unlink) is what airstate did before generations,
-- and what a replica of that age understands: it deletes every scope the registry lists,
-- stale or not, and the registry with its "g", in one step, O(map indices). It reads the
-- registry itself, so it never races a writer adding a map index. The scope keys it names
-- that way are not declared: each is probed with EXISTS before anything is deleted, so on
-- a Cluster slot in mid-migration a key this node no longer holds fails the script with
-- "non local key" before it has written anything, and the gateway retries it as it does
-- TRYAGAIN (it never follows ASK, so the script runs only where the registry is).
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

if mode == 'unlink' then
  local base, doomed, named = ARGV[2], {}, {[KEYS[2]] = true}
  for _, field in ipairs(redis.call('HKEYS', registry)) do
    if string.byte(field, 1) == 109 then -- 'm'
      local scope = base .. string.sub(field, 2)
      if not named[scope] then
        named[scope] = true
        doomed[#doomed + 1] = scope
        doomed[#doomed + 1] = scope .. ':x'
      end
    end
  end
  for first = 1, #doomed, 1000 do
    redis.call('EXISTS', unpack(doomed, first, math.min(first + 999, #doomed)))
  end
  doomed[#doomed + 1] = KEYS[1]
  doomed[#doomed + 1] = KEYS[2]
  doomed[#doomed + 1] = KEYS[3]
  for first = 1, #doomed, 1000 do
    redis.call('UNLINK', unpack(doomed, first, math.min(first + 999, #doomed)))
  end
  if ARGV[3] ~= '' then
    redis.call('PUBLISH', ARGV[3], 'c:')
  end
  return 0
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
