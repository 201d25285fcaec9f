-- consumer_delete.lua: delete a consumer record, its index entry and every
-- connection of the consumer (records, index entries, due entries, counts)
-- in one atomic step, and append the connections' deleted events. All keys
-- share the consumer's shard hash tag (the stream, when given, is on one
-- Redis, never on a Cluster).
--
-- KEYS: 1 consumer record, 2 consumers index, 3 all index, 4 counts,
--       5 due:check, 6 due:refresh, then per connection 3 keys: record,
--       service index, state index; then the event stream (optional)
-- ARGV: 1 consumer id, 2 number of connections n, then per connection
--       member, expected version, state, service id; then stream max
--       length, number of events, then per event the number of
--       field/value strings followed by them.
-- Returns {1, stream ids...}, or {0} when the consumer's connections are not
-- exactly the ones given at the given versions (the caller reads again).
local cid = ARGV[1]
local n = tonumber(ARGV[2])
-- at(i) is where connection i's arguments (member, version, state,
-- service) and keys (record, service index, state index) begin.
local function at(i)
  return 3 + (i - 1) * 4, 7 + (i - 1) * 3
end
local present = redis.call('ZRANGEBYLEX', KEYS[3], '[' .. cid .. '|', '(' .. cid .. '}')
if #present ~= n then
  return {0}
end
local given = {}
for i = 1, n do
  local a = at(i)
  given[ARGV[a]] = true
end
for _, m in ipairs(present) do
  if not given[m] then
    return {0}
  end
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
  redis.call('ZREM', KEYS[3], member)
  redis.call('ZREM', KEYS[k + 1], member)
  redis.call('ZREM', KEYS[k + 2], member)
  redis.call('ZREM', KEYS[5], member)
  redis.call('ZREM', KEYS[6], member)
  local f = svc .. '|' .. st
  if redis.call('HINCRBY', KEYS[4], f, -1) <= 0 then
    redis.call('HDEL', KEYS[4], f)
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], cid)

local out = {1}
local i = 3 + n * 4
local maxlen = ARGV[i]
local ne = tonumber(ARGV[i + 1])
local stream = KEYS[7 + n * 3]
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
