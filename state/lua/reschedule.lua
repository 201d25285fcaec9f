-- reschedule.lua: set a claimed member's next due time only if it still
-- carries the claim's lease score (a write since the claim wins).
--
-- KEYS: 1 due index
-- ARGV: 1 member, 2 lease score (ms), 3 next score (ms)
-- Returns 1 when rescheduled, 0 otherwise.
local cur = redis.call('ZSCORE', KEYS[1], ARGV[1])
if cur and tonumber(cur) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
  return 1
end
return 0
