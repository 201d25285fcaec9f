-- touch.lua: compare-and-set the version and data of a record whose state,
-- service and credentials stay as they are, and its due entries: the write
-- of a check that changes nothing but when it was made (the bulk of a
-- fleet's writes). write.lua does the same and more (indexes, counts,
-- credentials, events, fences); this is its lean path.
--
-- KEYS: 1 record, 2 due:check, 3 due:refresh
-- ARGV: 1 expected version, 2 new version, 3 data, 4 member,
--       5 check mode ("d" remove, "s" set, "n" set if absent), 6 check score,
--       7 refresh mode (as 5), 8 refresh score
-- Returns {1} or {0, current version}.
local cur = redis.call('HGET', KEYS[1], 'v')
if not cur then cur = '0' end
if cur ~= ARGV[1] then
  return {0, cur}
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[3])
local member = ARGV[4]
local function due(key, mode, score)
  if mode == 'd' then
    redis.call('ZREM', key, member)
  elseif mode == 's' then
    redis.call('ZADD', key, score, member)
  elseif mode == 'n' then
    redis.call('ZADD', key, 'NX', score, member)
  end
end
due(KEYS[2], ARGV[5], ARGV[6])
due(KEYS[3], ARGV[7], ARGV[8])
return {1}
