-- consumer.lua: create, update or ensure one consumer record and its index
-- entry in one atomic step. The record and the index share the consumer's
-- shard hash tag.
--
-- KEYS: 1 consumer record (hash), 2 consumers index (lex zset)
-- ARGV: 1 op ("c" create: must not exist; "u" update: must exist;
--       "e" ensure: create if absent, else leave alone), 2 consumer id,
--       3 metadata JSON ("" none), 4 now (unix ms), 5 set metadata ("1"/"0")
-- Returns {status, metadata, created, modified}: status 1 written, 0 the
-- op's precondition failed (exists / absent), 2 ensure found it present.
local exists = redis.call('EXISTS', KEYS[1]) == 1
local op = ARGV[1]
if op == 'c' and exists then
  return {0}
end
if op == 'u' and not exists then
  return {0}
end
if op == 'e' and exists then
  return {2}
end
if not exists then
  redis.call('HSET', KEYS[1], 'ca', ARGV[4])
  redis.call('ZADD', KEYS[2], 0, ARGV[2])
end
if ARGV[5] == '1' or not exists then
  if ARGV[3] == '' then
    redis.call('HDEL', KEYS[1], 'md')
  else
    redis.call('HSET', KEYS[1], 'md', ARGV[3])
  end
end
redis.call('HSET', KEYS[1], 'ma', ARGV[4])
local v = redis.call('HMGET', KEYS[1], 'md', 'ca', 'ma')
return {1, v[1] or '', v[2] or '', v[3] or ''}
