-- fence_extend.lua: extend the refresh lease if it is still ours.
--
-- KEYS: 1 lease
-- ARGV: 1 lease token, 2 new TTL (ms)
-- Returns 1 extended, 0 not ours (lapsed or taken by another holder).
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("PEXPIRE", KEYS[1], ARGV[2])
end
return 0
