-- Clear an asset (its values and writers) and tell its watchers, atomically.
--
-- KEYS[1] asset values hash, KEYS[2] asset writers hash (one hash tag: one Cluster slot)
-- ARGV: change channel ("" for none); "c:" is published there when anything was cleared
local removed = redis.call('UNLINK', KEYS[1], KEYS[2])
if removed > 0 and ARGV[1] ~= '' then
  redis.call('PUBLISH', ARGV[1], 'c:')
end
return removed
