-- claim_peek.lua: list up to max members of one due index that are due,
-- without moving them; claim.lua then claims them with their record keys
-- declared.
--
-- KEYS: 1 due index
-- ARGV: 1 now (ms), or "" for this node's TIME, 2 max
-- Returns {now (ms), member, ...}.
local now = ARGV[1]
if now == '' then
  local t = redis.call('TIME')
  now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local out = {now}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #due do
  out[#out + 1] = due[i]
end
return out
