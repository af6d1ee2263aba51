-- Set or delete one key of an asset together with the record of who wrote it.
--
-- KEYS[1] asset values hash   field = state key, value = "<updated_ms>.<version>::<json>"
--                             (values written before versions existed lack ".<version>")
-- KEYS[2] asset writers hash  field = state key, value = writer record (JSON)
-- ARGV: op ("set" | "del"), key, encoded value, writer record ("" on a set: no writer,
--       as an imported row Airflow stored without one),
--       if-match and if-none-match ("" when absent, "*", or ",v1,v2,"),
--       change channel ("" for none): published "s:<key bytes>:<key><encoded value>" or,
--       when a key was deleted, "d:<key bytes>:<key>"
-- Returns 0 when the precondition fails (nothing written), else 1.
local values, writers = KEYS[1], KEYS[2]
local if_match, if_none_match = ARGV[5] or '', ARGV[6] or ''
if if_match ~= '' or if_none_match ~= '' then
  -- Asset values never expire: their expiry field is empty.
  local current = live_version(redis.call('HGET', values, ARGV[2]), 0)
  if not precondition_holds(current, if_match, if_none_match) then
    return 0
  end
end
local channel, key = ARGV[7] or '', ARGV[2]
if ARGV[1] == 'set' then
  redis.call('HSET', values, key, ARGV[3])
  if ARGV[4] == '' then
    redis.call('HDEL', writers, key)
  else
    redis.call('HSET', writers, key, ARGV[4])
  end
  if channel ~= '' then
    redis.call('PUBLISH', channel, 's:' .. #key .. ':' .. key .. ARGV[3])
  end
else
  local removed = redis.call('HDEL', values, key)
  redis.call('HDEL', writers, key)
  if removed == 1 and channel ~= '' then
    redis.call('PUBLISH', channel, 'd:' .. #key .. ':' .. key)
  end
end
return 1
