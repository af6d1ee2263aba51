-- Takes or renews the lifecycle lease: one replica at a time runs reconcile passes.
--
-- KEYS[1] the lease string   value = holder id, with a TTL
-- ARGV: holder id, TTL in ms
-- Returns 1 when `holder` holds the lease for the next TTL, 0 when another holder does.
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
