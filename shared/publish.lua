-- Publish events on a session in one atomic step (Centrifugo's recipe):
-- stamp each with the session epoch and the next offset, append it to the
-- history stream (entry id "<offset>-0", trimmed and expiring), PUBLISH it.
-- KEYS: meta hash, history stream, channel, job text (or "" to skip)
-- ARGV: epoch candidate, history maxlen, ttl seconds, text to append, event JSON...
-- Returns {epoch, last offset}.
local meta, hist, chan, text_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local maxlen, ttl = ARGV[2], tonumber(ARGV[3])
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  -- New (or expired) session: a new epoch, offsets restart, stale history goes.
  epoch = ARGV[1]
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
end
local off = tonumber(redis.call('HGET', meta, 'offset'))
for i = 5, #ARGV do
  off = redis.call('HINCRBY', meta, 'offset', 1)
  local msg = '{"epoch":"' .. epoch .. '","offset":' .. off .. ',' .. string.sub(ARGV[i], 2)
  redis.call('XADD', hist, 'MAXLEN', '~', maxlen, off .. '-0', 'e', msg)
  redis.call('PUBLISH', chan, msg)
end
redis.call('EXPIRE', meta, ttl)
redis.call('EXPIRE', hist, ttl)
if ARGV[4] ~= "" then
  redis.call('APPEND', text_key, ARGV[4])
  redis.call('EXPIRE', text_key, ttl)
end
return {epoch, off}
