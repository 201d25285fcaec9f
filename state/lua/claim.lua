-- claim.lua: claim members of one due index that are still due: push each
-- to the lease score and read its service id and state from its record
-- (same hash tag, same slot). A member whose record is gone is removed.
-- Every key is declared: the record keys come in KEYS, in the order of
-- the members in ARGV. All reads come before the first write, so a
-- refused key leaves the index untouched.
--
-- KEYS: 1 due index, 2.. the record key of each member
-- ARGV: 1 now (ms), or "" for this node's TIME, 2 lease (ms), 3.. members
-- Returns {now (ms), lease score (ms), member, due score, service id,
--          state, ...}.
local now = ARGV[1]
if now == '' then
  local t = redis.call('TIME')
  now = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local lease = tostring(tonumber(now) + tonumber(ARGV[2]))
local take, gone = {}, {}
for i = 3, #ARGV do
  local m = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score and tonumber(score) <= tonumber(now) then
    local rec = redis.call('HMGET', KEYS[i - 1], 'svc', 'st')
    if rec[1] then
      take[#take + 1] = {m, score, rec[1], rec[2] or ''}
    else
      gone[#gone + 1] = m
    end
  end
end
local out = {now, lease}
for _, c in ipairs(take) do
  redis.call('ZADD', KEYS[1], lease, c[1])
  out[#out + 1] = c[1]
  out[#out + 1] = c[2]
  out[#out + 1] = c[3]
  out[#out + 1] = c[4]
end
for _, m in ipairs(gone) do
  redis.call('ZREM', KEYS[1], m)
end
return out
