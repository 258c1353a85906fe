-- Publish events on a session in one atomic step (Centrifugo's recipe):
-- stamp each with the session epoch and the next offset, append it to the
-- history stream (entry id "<offset>-0", trimmed and expiring), PUBLISH it.
-- A job's own events are fenced: they go out only under the job's current lease.
-- F (lease field names) is defined by the prelude shared/scripts.py adds.
-- KEYS: meta hash, history stream, channel, job text, job lease, job token ids
-- ARGV: epoch candidate, history maxlen, ttl seconds, text to append,
--       fence ("" for an unfenced publish), batch seq, packed token ids, tokens, terminal
--       ("1": this batch ends the job), event JSON...
-- Returns {"ok", epoch, last offset}, {"dup", epoch, offset} (this batch was applied
-- already: a retry after a lost reply), {"stale", current fence} (the job moved on), or
-- {"gap", epoch, offset} (Redis lost batches this attempt had published: a new epoch).
-- This runs once per job per flush on a busy worker: every redis.call here is paid per batch.
local meta, hist, chan = KEYS[1], KEYS[2], KEYS[3]
local text_key, lease, ids_key = KEYS[4], KEYS[5], KEYS[6]
local maxlen = ARGV[2]
local fence = ARGV[5]
local FIRST = 10
local m = redis.call('HMGET', meta, 'epoch', 'offset', 'ttl')
-- A session may carry its own TTL (short-lived OpenAI-route sessions).
local ttl = tonumber(m[3] or ARGV[3])
-- Expiries move with activity. Refreshing them on a long job's every batch buys nothing: a
-- fenced job refreshes on its first, every 16th and its last batch (short TTLs: always).
local refresh = true

local function new_epoch()
  -- As for a new session: followers see another epoch and resync; old positions mean nothing.
  local epoch = ARGV[1]
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
  redis.call('EXPIRE', meta, ttl)
  return epoch
end

if fence ~= '' then
  local l = redis.call('HMGET', lease, F.fence, F.seq, F.done)
  if l[1] ~= fence then
    if not l[1] or tonumber(l[1]) < tonumber(fence) then
      -- Fences only grow: a smaller one (or none) means Redis lost writes, not a takeover.
      return {'gap', new_epoch(), '0'}
    end
    return {'stale', l[1]}
  end
  local seq, have = tonumber(ARGV[6]), tonumber(l[2] or '0')
  if seq <= have then
    return {'dup', m[1] or '', m[2] or '0'}
  end
  if l[3] == '1' then
    return {'stale', l[1]}
  end
  if seq ~= have + 1 then
    -- Batches this attempt saw acknowledged are gone (Redis restarted from an older state):
    -- clients may hold offsets that will now be reused, so they must resync.
    return {'gap', new_epoch(), '0'}
  end
  refresh = seq == 1 or seq % 16 == 0 or ARGV[9] == '1' or ttl < 600
  if ARGV[9] == '1' then
    redis.call('HSET', lease, F.seq, seq, F.started, '1', F.done, '1', F.owner, '')
  else
    redis.call('HSET', lease, F.seq, seq, F.started, '1')
  end
  if ARGV[8] ~= '0' then
    redis.call('HINCRBY', lease, F.tokens, ARGV[8])
  end
  if ARGV[7] ~= '' then
    -- A key this APPEND creates gets its expiry at once, whatever the batch.
    if redis.call('APPEND', ids_key, ARGV[7]) == #ARGV[7] or refresh then
      redis.call('EXPIRE', ids_key, ttl)
    end
  end
  if refresh then
    redis.call('EXPIRE', lease, ttl)
  end
end

local epoch = m[1]
local off = tonumber(m[2])
if not epoch then
  -- New (or expired) session: a new epoch, offsets restart, stale history goes.
  epoch = ARGV[1]
  redis.call('DEL', hist)
  off = 0
  refresh = true
end
for i = FIRST, #ARGV do
  off = off + 1
  local msg = '{"epoch":"' .. epoch .. '","offset":' .. off .. ',' .. string.sub(ARGV[i], 2)
  redis.call('XADD', hist, 'MAXLEN', '~', maxlen, off .. '-0', 'e', msg)
  redis.call('PUBLISH', chan, msg)
end
redis.call('HSET', meta, 'epoch', epoch, 'offset', off)
if refresh then
  redis.call('EXPIRE', meta, ttl)
  redis.call('EXPIRE', hist, ttl)
end
if ARGV[4] ~= '' then
  if redis.call('APPEND', text_key, ARGV[4]) == #ARGV[4] or refresh then
    redis.call('EXPIRE', text_key, ttl)
  end
end
return {'ok', epoch, off}
