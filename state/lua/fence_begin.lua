-- fence_begin.lua: record the intent to exchange a refresh token, under the
-- refresh lease, before the provider is called.
--
-- KEYS: 1 lease, 2 intent
-- ARGV: 1 lease token, 2 lineage, 3 max age of another holder's in-flight
--       intent (ms), 4 retention of the intent key (ms)
-- Returns {-1} lease not ours; {0, lineage} another holder's exchange may
-- still be persisting; {1, prior lineage or "", "none"|"unknown"}.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {-1}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prior = redis.call('HMGET', KEYS[2], 'o', 'l', 't', 's')
local status = 'none'
local lineage = ''
if prior[2] then
  lineage = prior[2]
  if prior[4] == 'i' and prior[1] ~= ARGV[1] and (now - tonumber(prior[3] or '0')) < tonumber(ARGV[3]) then
    return {0, lineage}
  end
  -- An intent left behind (its holder died, or timed out without an
  -- answer): the outcome of that exchange is unknown.
  status = 'unknown'
end
redis.call('HSET', KEYS[2], 'o', ARGV[1], 'l', ARGV[2], 't', now, 's', 'i')
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1, lineage, status}
