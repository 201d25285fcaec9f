-- reschedule_many.lua: set claimed members' next due times (one or a batch of
-- one shard): each member gets its next due time only if it still carries its
-- claim's lease score (a write since the claim wins).
--
-- KEYS: 1 due index of one shard
-- ARGV: member, lease score (ms), next score (ms), repeated
-- Returns how many members were rescheduled.
local n = 0
for i = 1, #ARGV, 3 do
  local cur = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if cur and tonumber(cur) == tonumber(ARGV[i + 1]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[i + 2], ARGV[i])
    n = n + 1
  end
end
return n
