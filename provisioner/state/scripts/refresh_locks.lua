-- Keep the locks of live streams alive; report streams whose lock another session, or a
-- newer connection of the same session (a resume: new fence), took.
-- KEYS: lock per stream. ARGV: ttl_s, node id, then session and fence per stream.
local lost = {}
for i = 1, #KEYS do
  local sid, fence = ARGV[2 * i + 1], ARGV[2 * i + 2]
  local cur = redis.call('HMGET', KEYS[i], 'session', 'fence', 'node')
  if cur[1] == sid and cur[2] == fence then
    if cur[3] ~= ARGV[2] then redis.call('HSET', KEYS[i], 'node', ARGV[2]) end
    redis.call('PEXPIRE', KEYS[i], math.floor(tonumber(ARGV[1]) * 1000))
  elseif cur[1] and not (cur[1] == sid and tonumber(cur[2] or 0) < tonumber(fence)) then
    table.insert(lost, sid)
  else
    -- expired while Redis was away: nobody else holds it, so this stream keeps it; or this
    -- session's under an older fence (re-created from a stale report): the newer wins
    redis.call('HSET', KEYS[i], 'session', sid, 'fence', fence, 'node', ARGV[2])
    redis.call('PEXPIRE', KEYS[i], math.floor(tonumber(ARGV[1]) * 1000))
  end
end
return lost
