-- fence_settle.lua: end an exchange intent we own. "c" clears it (the
-- outcome is known: stored, or the provider answered without rotating);
-- "u" marks it unknown (the request may have reached the provider and no
-- answer came back): a later invalid_grant for that lineage is then not a
-- user revocation.
--
-- KEYS: 1 intent
-- ARGV: 1 lease token (the intent's owner), 2 "c" or "u"
-- Returns 0 not ours, 1 settled.
if redis.call("HGET", KEYS[1], "o") ~= ARGV[1] then
  return 0
end
if ARGV[2] == "c" then
  return redis.call("DEL", KEYS[1])
end
redis.call("HSET", KEYS[1], "o", "", "s", "u")
return 1
