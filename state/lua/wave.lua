-- The invalid-wave guard's sliding window (WaveCounter.Admit): the flips to
-- invalid let through for one integration within the window, one member
-- per connection revision, scored by the time (ms) it was let through.
-- KEYS[1] the window's sorted set; ARGV[1] now (ms), ARGV[2] the window
-- (ms), ARGV[3] the threshold, ARGV[4] the member. Returns {1, count, 0}
-- when the flip may go ahead (and counts it), {0, count, oldest} when the
-- window is full: oldest is when the oldest flip in it was let through. A
-- member already in the window (a retry after a failed write) goes ahead
-- without counting twice.
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then return {1, n, 0} end
if n >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, n, tonumber(oldest[2])}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window + 1000)
return {1, n + 1, 0}
