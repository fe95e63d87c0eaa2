-- Add a node's stream outcomes to its version's health: the node reports cumulative counts
-- since it loaded that version; what it reported before (seen_started, seen_failed on the
-- node's record, reset by a retarget) is not counted twice.
-- KEYS: node hash, health hash. ARGV: started, failed, loaded (0/1), load failed (0/1),
-- "model:version" the node says it serves: counted only if that is what it was given.
-- Returns 1 if a failure was added (the caller looks at rolling back at once), else 0.
local given = redis.call('HMGET', KEYS[1], 'model', 'version')
if not given[1] or (given[1] .. ':' .. (given[2] or '')) ~= ARGV[5] then return 0 end
local seen = redis.call('HMGET', KEYS[1], 'seen_started', 'seen_failed')
local fields, worse = {'started', 'failed'}, 0
for i = 1, 2 do
  local now, before = tonumber(ARGV[i]), tonumber(seen[i] or '0') or 0
  if now > before then
    redis.call('HINCRBY', KEYS[2], fields[i], now - before)
    redis.call('HSET', KEYS[1], 'seen_' .. fields[i], now)
    if i == 2 then worse = 1 end
  end
end
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[2], 'loaded', 1) end
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[2], 'load_failed', 1)
  worse = 1
end
return worse
