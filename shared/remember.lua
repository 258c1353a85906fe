-- Append an exchange to a session's conversation, unless it is already the last one there
-- (a job redelivered after its worker stored the exchange but before it acknowledged).
-- KEYS: conversation list
-- ARGV: marker (how this job's entry starts), entry JSON, exchanges kept, ttl seconds
-- Returns 1 when appended, 0 when it was there already.
local last = redis.call('LINDEX', KEYS[1], -1)
if last and string.sub(last, 1, #ARGV[1]) == ARGV[1] then
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
