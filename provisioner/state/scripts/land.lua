-- Release a single-flight token only if it is still ours. KEYS: flight key. ARGV: token.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
