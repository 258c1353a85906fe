-- A job's lease: who runs it, with which fencing token, and how far its answer got.
-- F (field names, from shared.keys.Lease) is defined by the prelude shared/scripts.py adds.
-- KEYS: lease hash, job text, job token ids
-- ARGV[1] is the action:
--   acquire owner entry ttl_ms space keep_s
--     -> {"ok", fence, attempts, handbacks, text, ids, space, tokens, started}
--      | {"busy", owner, entry, ms_left} | {"done", entry}
--   renew owner fence ttl_ms  -> 1, 2 when the job ended under that fence, or 0 when the
--                               lease moved on (the holder must stop)
--   release owner fence       -> 1, or 0 when it was not held under that fence
local lease, text_key, ids_key = KEYS[1], KEYS[2], KEYS[3]
local action = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function held_by(owner, fence)
  local l = redis.call('HMGET', lease, F.owner, F.fence, F.done)
  return l[1] == owner and l[2] == fence and l[3] ~= '1'
end

if action == 'acquire' then
  local owner, entry, ttl, space, keep = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
  local l = redis.call('HMGET', lease, F.owner, F.until_, F.done, F.entry, F.space, F.tokens,
                       F.started)
  if l[3] == '1' then
    return {'done', l[4] or ''}
  end
  if l[1] and l[1] ~= '' and l[1] ~= owner and tonumber(l[2] or '0') > now then
    return {'busy', l[1], l[4] or '', tostring(tonumber(l[2]) - now)}
  end
  local fence = redis.call('HINCRBY', lease, F.fence, 1)
  local attempts = redis.call('HINCRBY', lease, F.attempts, 1)
  redis.call('HSET', lease, F.owner, owner, F.until_, now + ttl, F.seq, 0, F.entry, entry)
  local tokens = tonumber(l[6] or '0')
  local have = l[5]
  if tokens == 0 then
    -- Nothing published yet: the ids this attempt writes are in its own space.
    have = space
    redis.call('HSET', lease, F.space, space)
    redis.call('DEL', ids_key)
  elseif have ~= space and have ~= '-' then
    -- Ids from another engine or model: this attempt continues from the text, and its own
    -- ids could not be appended to them; from now on every attempt uses the text.
    have = '-'
    redis.call('HSET', lease, F.space, '-')
    redis.call('DEL', ids_key)
  end
  redis.call('EXPIRE', lease, keep)
  local handbacks = redis.call('HGET', lease, F.handbacks) or '0'
  return {'ok', tostring(fence), tostring(attempts), handbacks,
          redis.call('GET', text_key) or '', redis.call('GET', ids_key) or '',
          have or '', tostring(tokens), l[7] or '0'}
elseif action == 'renew' then
  if not held_by(ARGV[2], ARGV[3]) then
    local l = redis.call('HMGET', lease, F.fence, F.done)
    if l[1] == ARGV[3] and l[2] == '1' then
      return 2  -- finished under this fence: nothing to renew, nothing lost
    end
    return 0
  end
  redis.call('HSET', lease, F.until_, now + tonumber(ARGV[4]))
  return 1
elseif action == 'release' then
  if not held_by(ARGV[2], ARGV[3]) then
    return 0
  end
  -- A new fence: anything the releasing attempt still sends is refused.
  redis.call('HINCRBY', lease, F.fence, 1)
  redis.call('HINCRBY', lease, F.handbacks, 1)
  redis.call('HSET', lease, F.owner, '', F.until_, 0)
  return 1
end
return redis.error_reply('lease.lua: unknown action ' .. tostring(action))
