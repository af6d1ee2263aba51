-- Set, delete or just tidy one key of a task scope, keeping the scope's expiry
-- bookkeeping consistent in the same atomic step. Safe to run twice.
--
-- KEYS[1] scope hash       field = state key, value = "<updated_ms>.<version>:<expires_ms>:<json>"
--                          (values written before versions existed lack ".<version>")
-- KEYS[2] expiry zset      member = state key, score = expires_ms (expiring keys only)
-- KEYS[3] registry hash    "m<map_index>" per map index holding state, valued the task's
--                          generation it was written in plus one; "g", the task's
--                          current generation (absent: 0); and the readable dag_id /
--                          run_id / task_id and, when known, dag_run_id (for listing and
--                          clear-all)
-- ARGV: op ("set" | "del" | "purge"), key, encoded value, expires_ms or "",
--       now_ms, map_index, dag_id, run_id, task_id,
--       if-match and if-none-match ("" when absent, "*", or ",v1,v2,"),
--       change channel ("" for none): a set or an actual delete is published there as
--       "s<map_index>:<key bytes>:<key><encoded value>" / "d<map_index>:<key bytes>:<key>",
--       dag_run_id ("" when the identity has none)
-- Returns {-1, 0} when the precondition fails (nothing written), else
-- {fields left, earliest pending expiry}; the expiry is 0 unless the scope mixes
-- expiring and permanent keys, the one case key-level expiry cannot cover: the caller
-- then lists the scope in the sweep index so its expired keys are reclaimed untouched.
--
-- Clear-all only raises "g" (lua/task_clear.lua): a scope whose "m" value is at most "g"
-- is stale, and reads as empty everywhere. A write that finds its scope stale unlinks it
-- first (O(1) on the main thread: UNLINK frees off it) and then goes on as on an empty
-- scope, so a scope never mixes generations, and stale data is never written again.
--
-- Redis 7.0 has no per-field TTL (HEXPIRE is 7.4+), so expired fields are reclaimed
-- here, bounded per call, and the whole hash gets a key-level expiry once every field
-- in it expires, so a scope nobody touches again still frees itself.
local scope, expiry, registry = KEYS[1], KEYS[2], KEYS[3]
local op, key, now = ARGV[1], ARGV[2], ARGV[5]
local index_field = 'm' .. ARGV[6]
local fresh_registry = false
local marks = redis.call('HMGET', registry, 'g', index_field)
local generation, written_in = tonumber(marks[1] or '0'), marks[2]
local stale = written_in ~= false and tonumber(written_in) <= generation

-- Optimistic concurrency: the key's current version (nil if absent, expired or stale)
-- must satisfy If-Match / If-None-Match before anything is written.
local if_match, if_none_match = ARGV[10] or '', ARGV[11] or ''
if (op == 'set' or op == 'del') and (if_match ~= '' or if_none_match ~= '') then
  local current = nil
  if not stale then
    current = live_version(redis.call('HGET', scope, key), now)
  end
  if not precondition_holds(current, if_match, if_none_match) then
    return {-1, 0}
  end
end

if stale then
  redis.call('UNLINK', scope, expiry)
end

local channel = ARGV[12] or ''
if op == 'set' then
  fresh_registry = redis.call('EXISTS', registry) == 0
  redis.call('HSET', scope, key, ARGV[3])
  if channel ~= '' then
    redis.call('PUBLISH', channel, 's' .. ARGV[6] .. ':' .. #key .. ':' .. key .. ARGV[3])
  end
  if ARGV[4] == '' then
    redis.call('ZREM', expiry, key)
  else
    redis.call('ZADD', expiry, ARGV[4], key)
  end
  -- HSET, not HSETNX: a stale scope's field moves on to the current generation.
  redis.call('HSET', registry, index_field, generation + 1)
  if fresh_registry then
    redis.call('HSET', registry, 'dag_id', ARGV[7], 'run_id', ARGV[8], 'task_id', ARGV[9])
    if (ARGV[13] or '') ~= '' then
      redis.call('HSET', registry, 'dag_run_id', ARGV[13])
    end
  end
elseif op == 'del' then
  if redis.call('HDEL', scope, key) == 1 and channel ~= '' then
    redis.call('PUBLISH', channel, 'd' .. ARGV[6] .. ':' .. #key .. ':' .. key)
  end
  redis.call('ZREM', expiry, key)
end

local dead = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, 256)
if #dead > 0 then
  redis.call('HDEL', scope, unpack(dead))
  redis.call('ZREM', expiry, unpack(dead))
end

local fields = redis.call('HLEN', scope)
if fields == 0 then
  redis.call('UNLINK', expiry)
  redis.call('HDEL', registry, index_field)
  -- Only the readable identity (and "g") left: no scope holds data, stale or not, so
  -- the generation may start over at 0 with the next registry.
  if redis.call('HLEN', registry) <= 3 + redis.call('HEXISTS', registry, 'dag_run_id')
      + redis.call('HEXISTS', registry, 'g') then
    redis.call('UNLINK', registry)
  end
  return {0, 0}
end

local expiring = redis.call('ZCARD', expiry)
if expiring == fields then
  local last = redis.call('ZRANGE', expiry, -1, -1, 'WITHSCORES')[2]
  redis.call('PEXPIREAT', scope, last)
  redis.call('PEXPIREAT', expiry, last)
  -- The registry must outlive every scope it lists; a persistent registry stays so.
  local registry_ttl = redis.call('PTTL', registry)
  if registry_ttl == -1 and fresh_registry then
    redis.call('PEXPIREAT', registry, last)
  elseif registry_ttl >= 0 then
    redis.call('PEXPIREAT', registry, last, 'GT')
  end
else
  redis.call('PERSIST', scope)
  redis.call('PERSIST', expiry)
  redis.call('PERSIST', registry)
end
if expiring > 0 and expiring < fields then
  return {fields, tonumber(redis.call('ZRANGE', expiry, 0, 0, 'WITHSCORES')[2])}
end
return {fields, 0}
