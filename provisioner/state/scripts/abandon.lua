-- A lobby that leaves: out of the queue, back with any node the assign script had already
-- given it (its reservation, never a live stream's slot), and its lock released; unless a
-- resume of the session holds the lock under a newer fence: the queue entry, the node and
-- the lock are the resume's then. KEYS: queue, vc:assigned, the user's lock. ARGV: session,
-- fence. Returns the node id it had been given, or ''.
local held = redis.call('HMGET', KEYS[3], 'session', 'fence')
if held[1] == ARGV[1] and tonumber(held[2] or 0) > tonumber(ARGV[2]) then return '' end
redis.call('ZREM', KEYS[1], ARGV[1])
local node = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if held[1] == ARGV[1] then redis.call('DEL', KEYS[3]) end
return node or ''
