-- fence_abandon.lua: give up an exchange whose intent may or may not have
-- been recorded (BeginExchange sent, its reply lost: a stalled Redis may
-- still run it when it wakes). The provider was not called. In one atomic
-- step: an intent we own is marked unknown (not in flight, so the next
-- holder need not wait for it to age out), and our lease is released (so
-- a BeginExchange of ours that Redis runs after this is refused). Either
-- order of the two on a waking Redis ends with no intent of ours in flight.
--
-- KEYS: 1 lease, 2 intent
-- ARGV: 1 lease token
-- Returns 1.
if redis.call('HGET', KEYS[2], 'o') == ARGV[1] then
  redis.call('HSET', KEYS[2], 'o', '', 's', 'u')
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
