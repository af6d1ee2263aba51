-- Optimistic concurrency, shared by the write scripts: Rust prepends this file to
-- task_write.lua and asset_write.lua when it loads them (see src/store/redis/scripts.rs),
-- so it defines functions only and reads no KEYS or ARGV.

-- The version of an encoded value "<updated_ms>.<version>:<expires_ms or empty>:<json>"
-- (values written before versions existed lack ".<version>": "L<updated_ms>"), or nil
-- when there is no value or it expired by now_ms.
local function live_version(raw, now_ms)
  if not raw then
    return nil
  end
  local head, expires = string.match(raw, '^([^:]*):([^:]*):')
  if not head or (expires ~= '' and tonumber(expires) <= tonumber(now_ms)) then
    return nil
  end
  local dot = string.find(head, '.', 1, true)
  return dot and string.sub(head, dot + 1) or ('L' .. head)
end

-- Whether If-Match / If-None-Match ("" when absent, "*", or ",v1,v2,") let a write go
-- ahead over a key whose current version is `current` (nil: absent).
local function precondition_holds(current, if_match, if_none_match)
  local function listed(tags)
    return tags == '*' or string.find(tags, ',' .. current .. ',', 1, true) ~= nil
  end
  if if_match ~= '' and (current == nil or not listed(if_match)) then
    return false
  end
  if if_none_match ~= '' and current ~= nil and listed(if_none_match) then
    return false
  end
  return true
end

