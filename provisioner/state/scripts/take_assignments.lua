-- The nodes the assign script gave these waiting sessions, taken (read once). A session
-- whose lock a newer fence of it holds (a resume, waiting in another process) is left for
-- that one. KEYS: vc:assigned, then the user's lock per waiter. ARGV: session and fence per
-- waiter. Returns session, node, session, node, ... (one HMGET when nothing was assigned)
local sids = {}
for i = 2, #KEYS do sids[#sids + 1] = ARGV[2 * i - 3] end
local nodes = redis.call('HMGET', KEYS[1], unpack(sids))
local out = {}
for i = 2, #KEYS do
  local node = nodes[i - 1]
  if node then
    local sid, fence = ARGV[2 * i - 3], ARGV[2 * i - 2]
    local held = redis.call('HMGET', KEYS[i], 'session', 'fence')
    if not (held[1] == sid and tonumber(held[2] or 0) > tonumber(fence)) then
      redis.call('HDEL', KEYS[1], sid)
      out[#out + 1] = sid
      out[#out + 1] = node
    end
  end
end
return out
