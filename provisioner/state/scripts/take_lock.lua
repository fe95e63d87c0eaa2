-- requires: take_lock
-- KEYS: lock, fence. ARGV: session, model, region, now, ttl_s, takeover (1/0).
return take_lock(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
