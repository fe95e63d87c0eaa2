-- Release the lock only if this session still holds it. KEYS: lock. ARGV: session.
if redis.call('HGET', KEYS[1], 'session') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
