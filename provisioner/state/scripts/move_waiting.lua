-- A waiting session changes queue (its region went down): it keeps its enqueue time, so
-- it keeps its turn (a resume stays first). Not moved once the assign script gave it a
-- node. KEYS: old queue, new queue, vc:queues, vc:assigned. ARGV: session, new pool.
-- Returns 1 if moved.
if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then return 0 end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 'NX', score, ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
return 1
