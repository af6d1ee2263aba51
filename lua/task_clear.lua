-- Clear one map index of a task, or every map index of it, atomically, and tell change
-- streams (publishing in the same script, so no clear goes unannounced).
--
-- mode "one": KEYS[1] registry hash, KEYS[2] the caller's scope hash, KEYS[3] its
--             expiry zset; ARGV: "one", scope key base, map_index, channel
-- mode "all": KEYS[1] registry hash, then the scope hash and expiry zset of every map
--             index the registry listed when the caller read it, in pairs;
--             ARGV: "all", scope key base ("<prefix>{t:<digest>}:"), channel
-- An empty channel publishes nothing.
--
-- The registry lists the map indices holding state as "m<map_index>", besides the
-- readable dag_id / run_id / task_id and, when known, dag_run_id. Every key here shares KEYS[1]'s hash tag, so the
-- script stays in one Cluster slot however many map indices it wipes; and every key it
-- deletes is declared, so a slot mid-migration is refused (TRYAGAIN) as a whole instead
-- of being half cleared. UNLINK frees big hashes off the main thread.
local registry, mode, base = KEYS[1], ARGV[1], ARGV[2]

if mode == 'all' then
  local declared = {}
  for i = 2, #KEYS, 2 do
    declared[KEYS[i]] = true
  end
  -- A map index added since the caller read the registry: it must read again.
  for _, field in ipairs(redis.call('HKEYS', registry)) do
    if string.byte(field, 1) == 109 and not declared[base .. string.sub(field, 2)] then -- 'm'
      return -1
    end
  end
  for first = 1, #KEYS, 1000 do
    redis.call('UNLINK', unpack(KEYS, first, math.min(first + 999, #KEYS)))
  end
  if ARGV[3] ~= '' then
    redis.call('PUBLISH', ARGV[3], 'c:')
  end
  return (#KEYS - 1) / 2
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
