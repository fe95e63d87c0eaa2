-- Take the user's single-stream lock unless another session holds it and this is no
-- take-over. Returns {1, fence, previous session, its node} or {0, holder session, model,
-- region, since}.
local function take_lock(lock, fence_key, session, model, region, now, ttl_s, takeover)
  local cur = redis.call('HGET', lock, 'session')
  if cur and cur ~= session and takeover ~= '1' then
    local h = redis.call('HMGET', lock, 'model', 'region', 'since')
    return {0, cur, h[1] or '', h[2] or '', h[3] or ''}
  end
  local since = now
  local prev_node = redis.call('HGET', lock, 'node') or ''
  if cur == session then since = redis.call('HGET', lock, 'since') or now end
  local fence = redis.call('INCR', fence_key)
  redis.call('DEL', lock)
  redis.call('HSET', lock, 'session', session, 'fence', fence, 'model', model,
             'region', region, 'since', since)
  redis.call('PEXPIRE', lock, math.floor(tonumber(ttl_s) * 1000))
  return {1, tostring(fence), cur or '', prev_node}
end
