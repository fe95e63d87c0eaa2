-- Mark an empty node retired so nothing new lands on it; refuses a node with sessions.
-- KEYS: node hash, slot zset. ARGV: now. Returns 1 if retired (0 if it already was).
if redis.call('HEXISTS', KEYS[1], 'retired') == 1 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
if redis.call('ZCARD', KEYS[2]) > 0 then return 0 end
redis.call('HSET', KEYS[1], 'retired', ARGV[1])
return 1
