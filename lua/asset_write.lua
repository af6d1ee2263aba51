-- Set or delete one key of an asset together with the record of who wrote it.
--
-- KEYS[1] asset values hash   field = state key, value = "<updated_ms>::<json>"
-- KEYS[2] asset writers hash  field = state key, value = writer record (JSON)
-- ARGV: op ("set" | "del"), key, encoded value, writer record
local values, writers = KEYS[1], KEYS[2]
if ARGV[1] == 'set' then
  redis.call('HSET', values, ARGV[2], ARGV[3])
  redis.call('HSET', writers, ARGV[2], ARGV[4])
else
  redis.call('HDEL', values, ARGV[2])
  redis.call('HDEL', writers, ARGV[2])
end
return 1
