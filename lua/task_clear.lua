-- Clear one map index of a task, or every map index of it, atomically, and tell change
-- streams (publishing in the same script, so no clear goes unannounced).
--
-- mode "one": KEYS[1] registry hash, KEYS[2] the caller's scope hash, KEYS[3] its
--             expiry zset; ARGV: "one", scope key base, map_index, channel
-- mode "all": KEYS[1] registry hash, KEYS[2] / KEYS[3] the caller's own scope hash and
--             expiry zset; ARGV: "all", scope key base ("<prefix>{t:<digest>}:"), channel
-- An empty channel publishes nothing.
--
-- The registry lists the map indices holding state as "m<map_index>", besides the
-- readable dag_id / run_id / task_id and, when known, dag_run_id. Every key here shares
-- KEYS[1]'s hash tag, so the script stays in one Cluster slot however many map indices it
-- wipes. UNLINK frees big hashes off the main thread.
--
-- Clear-all reads the registry itself, in the same atomic step as the deletes, so a map
-- index added a moment before is cleared too and one added after is not: the clear never
-- races the registry and never has to be retried for it (issue 15 item 7). The scope keys
-- it names that way are not declared. On a Cluster that is safe because the gateway never
-- follows ASK (the script runs only on the node that owns, or is migrating, the slot and
-- holds the registry), and every such key is probed with EXISTS before anything is
-- deleted: while the slot is migrating, a probe of a key this node no longer holds (or
-- never held) fails the script with "non local key" before it has written anything, and
-- the gateway retries it like TRYAGAIN until the slot has settled. Once every probe has
-- passed, every key is local and the deletes cannot fail half way.
local registry, mode, base = KEYS[1], ARGV[1], ARGV[2]

if mode == 'all' then
  local doomed, named = {}, {[KEYS[2]] = true}
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
  return (#doomed - 1) / 2
end

redis.call('UNLINK', KEYS[2], KEYS[3])
redis.call('HDEL', registry, 'm' .. ARGV[3])
if redis.call('HLEN', registry) <= 3 + redis.call('HEXISTS', registry, 'dag_run_id') then
  redis.call('UNLINK', registry)
end
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[4], 'c' .. ARGV[3] .. ':')
end
return 1
