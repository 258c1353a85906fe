-- Publish batches of events on sessions in one atomic step each (Centrifugo's recipe): stamp
-- each event with its session's epoch and next offset, append it to the history stream (entry
-- id "<offset>-0", trimmed and expiring), PUBLISH it. A job's own batches are fenced: they go
-- out only under the job's current lease.
-- F (lease field names) is defined by the prelude shared/scripts.py adds.
-- One call carries many batches (a worker's whole flush, where its keys share one node): per
-- call Redis pays the command, the script lookup and the reply once, not once per batch.
-- KEYS, 6 per batch: meta hash, history stream, channel, job text, job lease, job token ids
-- ARGV: history maxlen, default ttl seconds; then per batch: epoch candidate, text to append,
--       fence ("" for an unfenced publish), batch seq, packed token ids, tokens, terminal
--       ("1": this batch ends the job), the number of events n, then n event JSONs.
-- Returns one reply per batch, in order: {"ok", epoch, last offset}, {"dup", epoch, offset}
-- (this batch was applied already: a retry after a lost reply), {"stale", current fence} (the
-- job moved on), {"gap", epoch, "0"} (Redis lost batches this attempt had published: a new
-- epoch), or an error reply for that batch alone.
-- Every redis.call here is paid per batch, and a busy worker sends one batch per job per flush.
local maxlen, default_ttl = ARGV[1], ARGV[2]

local function publish(k, a, first, last)
  local meta, hist, chan = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  local text_key, lease, ids_key = KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  local fence, text, terminal = ARGV[a + 2], ARGV[a + 1], ARGV[a + 6] == '1'
  local m = redis.call('HMGET', meta, 'epoch', 'offset', 'ttl')
  -- A session may carry its own TTL (short-lived OpenAI-route sessions).
  local ttl = tonumber(m[3] or default_ttl)
  -- Expiries move with activity. Refreshing them on a long job's every batch buys nothing: a
  -- fenced job refreshes on its first, every 16th and its last batch (short TTLs: always).
  local refresh = true

  local function new_epoch()
    -- As for a new session: followers see another epoch and resync; old positions mean nothing.
    local epoch = ARGV[a]
    redis.call('DEL', hist)
    redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
    redis.call('EXPIRE', meta, ttl)
    return epoch
  end

  if fence ~= '' then
    local l = redis.call('HMGET', lease, F.fence, F.seq, F.done, F.tokens)
    if l[1] ~= fence then
      if not l[1] or tonumber(l[1]) < tonumber(fence) then
        -- Fences only grow: a smaller one (or none) means Redis lost writes, not a takeover.
        return {'gap', new_epoch(), '0'}
      end
      return {'stale', l[1]}
    end
    local seq, have = tonumber(ARGV[a + 3]), tonumber(l[2] or '0')
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
    refresh = seq == 1 or seq % 16 == 0 or terminal or ttl < 600
    local tokens = (tonumber(l[4]) or 0) + tonumber(ARGV[a + 5])
    if terminal then
      redis.call('HSET', lease, F.seq, seq, F.tokens, tokens, F.started, '1', F.done, '1',
                 F.owner, '')
    elseif seq == 1 then
      redis.call('HSET', lease, F.seq, seq, F.tokens, tokens, F.started, '1')
    else
      redis.call('HSET', lease, F.seq, seq, F.tokens, tokens)
    end
    local ids = ARGV[a + 4]
    if ids ~= '' then
      -- A key this APPEND creates gets its expiry at once, whatever the batch.
      if redis.call('APPEND', ids_key, ids) == #ids or refresh then
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
    epoch = ARGV[a]
    redis.call('DEL', hist)
    off = 0
    refresh = true
  end
  for i = first, last do
    off = off + 1
    local msg = '{"epoch":"' .. epoch .. '","offset":' .. off .. ',' .. string.sub(ARGV[i], 2)
    redis.call('XADD', hist, 'MAXLEN', '~', maxlen, off .. '-0', 'e', msg)
    redis.call('PUBLISH', chan, msg)
  end
  if m[1] then
    redis.call('HSET', meta, 'offset', off)
  else
    redis.call('HSET', meta, 'epoch', epoch, 'offset', off)
  end
  if refresh then
    redis.call('EXPIRE', meta, ttl)
    redis.call('EXPIRE', hist, ttl)
  end
  if text ~= '' then
    if redis.call('APPEND', text_key, text) == #text or refresh then
      redis.call('EXPIRE', text_key, ttl)
    end
  end
  return {'ok', epoch, off}
end

local replies = {}
local a = 3
for k = 1, #KEYS, 6 do
  local first = a + 8
  local last = first + tonumber(ARGV[a + 7]) - 1
  -- One batch's error (a key of the wrong type) is that batch's reply, not the whole call's.
  local ok, reply = pcall(publish, k, a, first, last)
  if not ok then
    reply = redis.error_reply(type(reply) == 'table' and reply.err or tostring(reply))
  end
  replies[#replies + 1] = reply
  a = last + 1
end
return replies
