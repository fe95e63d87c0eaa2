-- Extend a single-flight token's lease if it is still ours. KEYS: flight key.
-- ARGV: token, ttl in ms. Returns 1 if extended, 0 if the lease was lost.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
