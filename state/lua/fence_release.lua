-- fence_release.lua: release the refresh lease if it is still ours.
--
-- KEYS: 1 lease
-- ARGV: 1 lease token
-- Returns 1 released, 0 not ours.
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
