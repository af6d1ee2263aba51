-- Clear one map index of a task, or every map index of it, atomically.
--
-- KEYS[1] registry hash (lists the map indices holding state, as "m<map_index>")
-- KEYS[2] the caller's scope hash, KEYS[3] its expiry zset
-- ARGV: mode ("one" | "all"), scope key base ("<prefix>{t:<digest>}:"), map_index
--
-- Every key named here shares KEYS[1]'s hash tag, so the script stays in one Cluster
-- slot however many map indices it wipes. UNLINK frees big hashes off the main thread.
local registry, scope, expiry = KEYS[1], KEYS[2], KEYS[3]
local mode, base = ARGV[1], ARGV[2]

if mode == 'all' then
  local fields = redis.call('HKEYS', registry)
  local cleared = 0
  for _, field in ipairs(fields) do
    if string.byte(field, 1) == 109 then -- 'm'
      local index = string.sub(field, 2)
      redis.call('UNLINK', base .. index, base .. index .. ':x')
      cleared = cleared + 1
    end
  end
  redis.call('UNLINK', registry, scope, expiry)
  return cleared
end

redis.call('UNLINK', scope, expiry)
redis.call('HDEL', registry, 'm' .. ARGV[3])
if redis.call('HLEN', registry) <= 3 then
  redis.call('UNLINK', registry)
end
return 1
