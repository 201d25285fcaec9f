-- write.lua: compare-and-set one connection record and every index entry
-- of it in one atomic step.
--
-- KEYS: 1 record, 2 service index, 3 old state index, 4 new state index,
--       5 counts, 6 due:check, 7 due:refresh, 8 refresh lease,
--       9 refresh intent, 10 event stream (optional: absent on Redis
--       Cluster)
-- ARGV: 1 expected version ("0": must not exist), 2 op ("s" set, "d" delete),
--       3 member, 4 new version, 5 new state, 6 old state ("" when created),
--       7 service id, 8 data, 9 credentials mode ("k" keep, "s" set, "d" drop),
--       10 sealed credentials, 11 check mode ("d" remove, "s" set, "n" set if
--       absent), 12 check score, 13 refresh mode (as 11), 14 refresh score,
--       15 stream max length, 16 number of events, 17 fence ("" none, "I"
--       the refresh intent must be ours, "L" the lease and the intent must be
--       ours), 18 lease token, 19 "1" to clear our intent with the write,
--       then from 20 per event the number of field/value strings followed by
--       them.
-- Returns {1, stream ids...}, {0, current version} or {-1} (fence lost).
local cur = redis.call('HGET', KEYS[1], 'v')
if not cur then cur = '0' end
if cur ~= ARGV[1] then
  return {0, cur}
end

local fence, token = ARGV[17], ARGV[18]
if fence ~= '' then
  if redis.call('HGET', KEYS[9], 'o') ~= token then
    return {-1}
  end
  if fence == 'L' and redis.call('GET', KEYS[8]) ~= token then
    return {-1}
  end
  if ARGV[19] == '1' then
    redis.call('DEL', KEYS[9])
  end
end

local member, svc = ARGV[3], ARGV[7]
local newst, oldst = ARGV[5], ARGV[6]

local function count(st, by)
  local f = svc .. '|' .. st
  if redis.call('HINCRBY', KEYS[5], f, by) <= 0 then
    redis.call('HDEL', KEYS[5], f)
  end
end

local function due(key, mode, score)
  if mode == 'd' then
    redis.call('ZREM', key, member)
  elseif mode == 's' then
    redis.call('ZADD', key, score, member)
  elseif mode == 'n' then
    redis.call('ZADD', key, 'NX', score, member)
  end
end

if ARGV[2] == 'd' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  redis.call('ZREM', KEYS[6], member)
  redis.call('ZREM', KEYS[7], member)
  count(oldst, -1)
else
  redis.call('HSET', KEYS[1], 'v', ARGV[4], 'st', newst, 'svc', svc, 'd', ARGV[8])
  if ARGV[9] == 's' then
    redis.call('HSET', KEYS[1], 'c', ARGV[10])
  elseif ARGV[9] == 'd' then
    redis.call('HDEL', KEYS[1], 'c')
  end
  if oldst == '' then
    redis.call('ZADD', KEYS[2], 0, member)
    redis.call('ZADD', KEYS[4], 0, member)
    count(newst, 1)
  elseif oldst ~= newst then
    redis.call('ZREM', KEYS[3], member)
    redis.call('ZADD', KEYS[4], 0, member)
    count(oldst, -1)
    count(newst, 1)
  end
  due(KEYS[6], ARGV[11], ARGV[12])
  due(KEYS[7], ARGV[13], ARGV[14])
end

local out = {1}
local n = tonumber(ARGV[16])
if n > 0 and KEYS[10] then
  local i = 20
  for _ = 1, n do
    local k = tonumber(ARGV[i])
    local fields = {}
    for j = 1, k do
      fields[j] = ARGV[i + j]
    end
    i = i + k + 1
    out[#out + 1] = redis.call('XADD', KEYS[10], 'MAXLEN', '~', ARGV[15], '*', unpack(fields))
  end
end
return out
