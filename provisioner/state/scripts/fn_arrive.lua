-- Update a pool's arrival-rate EWMAs: `rate` with time constant tau_s and `fast` with
-- max(tau_s * 0.1, 10) (policy.fast_tau_s), so a burst shows within seconds.
local function arrive(key, now, tau)
  local h = redis.call('HMGET', key, 'rate', 't', 'fast')
  local rate, t, fast = tonumber(h[1] or 0), tonumber(h[2] or now), tonumber(h[3] or 0)
  local dt = math.max(0, now - t)
  rate = rate * math.exp(-dt / tau) + 1 / tau
  local ftau = math.max(tau * 0.1, 10)
  fast = fast * math.exp(-dt / ftau) + 1 / ftau
  redis.call('HSET', key, 'rate', rate, 't', now, 'fast', fast)
  return rate
end
