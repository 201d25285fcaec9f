-- consumer_delete.lua: delete a consumer record, its index entry and every
-- connection of the consumer (records, index entries, due entries, counts)
-- in one atomic step, and append the connections' deleted events. All keys
-- share the consumer's shard hash tag (the stream, when given, is on one
-- Redis, never on a Cluster).
--
-- KEYS: 1 consumer record, 2 consumers index, 3 counts, 4 due:check,
--       5 due:refresh, then the index of each of the m services of the
--       shard, then per connection 3 keys: record, service index, state
--       index; then the event stream (optional)
-- ARGV: 1 consumer id, 2 number of connections n, 3 number of services m,
--       then the m service ids, then per connection member, expected
--       version, state, service id; then stream max length, number of
--       events, then per event the number of field/value strings followed
--       by them.
-- Returns {1, stream ids...}, or {0} when the consumer's connections are not
-- exactly the ones given at the given versions, or the shard holds a
-- service not given (the caller reads again).
local cid = ARGV[1]
local n = tonumber(ARGV[2])
local m = tonumber(ARGV[3])
-- at(i) is where connection i's arguments (member, version, state,
-- service) and keys (record, service index, state index) begin.
local function at(i)
  return 4 + m + (i - 1) * 4, 6 + m + (i - 1) * 3
end
-- Every connection is in the index of its service; the counts hash names
-- every service of the shard.
local svcs = {}
for j = 1, m do
  svcs[ARGV[3 + j]] = true
end
local counts = redis.call('HKEYS', KEYS[3])
for _, f in ipairs(counts) do
  local svc = string.match(f, '^([^|]*)|')
  if svc and not svcs[svc] then
    return {0}
  end
end
local given = {}
for i = 1, n do
  local a = at(i)
  given[ARGV[a]] = true
end
local present = 0
for j = 1, m do
  local found = redis.call('ZRANGEBYLEX', KEYS[5 + j], '[' .. cid .. '|', '(' .. cid .. '}')
  for _, member in ipairs(found) do
    if not given[member] then
      return {0}
    end
  end
  present = present + #found
end
if present ~= n then
  return {0}
end
for i = 1, n do
  local a, k = at(i)
  if redis.call('HGET', KEYS[k], 'v') ~= ARGV[a + 1] then
    return {0}
  end
end
for i = 1, n do
  local a, k = at(i)
  local member, st, svc = ARGV[a], ARGV[a + 2], ARGV[a + 3]
  redis.call('DEL', KEYS[k])
  redis.call('ZREM', KEYS[k + 1], member)
  redis.call('ZREM', KEYS[k + 2], member)
  redis.call('ZREM', KEYS[4], member)
  redis.call('ZREM', KEYS[5], member)
  local f = svc .. '|' .. st
  if redis.call('HINCRBY', KEYS[3], f, -1) <= 0 then
    redis.call('HDEL', KEYS[3], f)
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], cid)

local out = {1}
local i = 4 + m + n * 4
local maxlen = ARGV[i]
local ne = tonumber(ARGV[i + 1])
local stream = KEYS[6 + m + n * 3]
i = i + 2
if ne > 0 and stream then
  for _ = 1, ne do
    local k = tonumber(ARGV[i])
    local fields = {}
    for j = 1, k do
      fields[j] = ARGV[i + j]
    end
    i = i + k + 1
    out[#out + 1] = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  end
end
return out
