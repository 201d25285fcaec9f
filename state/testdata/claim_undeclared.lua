-- claim.lua: take up to max due members of one due index and push them to
-- the lease score, reading service id and state from each record (same
-- hash tag, same slot). A member whose record is gone is removed.
--
-- KEYS: 1 due index
-- ARGV: 1 now (ms), 2 lease score (ms), 3 max, 4 record key prefix
-- Returns {member, due score, service id, state, ...}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for i = 1, #due, 2 do
  local m = due[i]
  local rec = redis.call('HMGET', ARGV[4] .. m, 'svc', 'st')
  if not rec[1] then
    redis.call('ZREM', KEYS[1], m)
  else
    redis.call('ZADD', KEYS[1], ARGV[2], m)
    out[#out + 1] = m
    out[#out + 1] = due[i + 1]
    out[#out + 1] = rec[1]
    out[#out + 1] = rec[2] or ''
  end
end
return out
