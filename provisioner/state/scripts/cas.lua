-- Compare-and-set one hash field: the caller computed `new` from `old` (a pure function),
-- and it is written only if nobody changed the field meanwhile (else the caller retries).
-- KEYS: the hash. ARGV: field, old value ("" = absent), new value. Returns 1 if written.
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
