-- Deploy a model version: it becomes live, the old live version drains until the deadline.
-- KEYS: vc:models. ARGV: model, version, semitones, drain deadline.
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local entry = raw and cjson.decode(raw) or {live = false, draining = {}}
local draining = {}
for _, d in ipairs(entry.draining or {}) do
  if d.version ~= ARGV[2] then table.insert(draining, d) end
end
if entry.live and entry.live.version ~= ARGV[2] then
  table.insert(draining, {version = entry.live.version, semitones = entry.live.semitones,
                          deadline = tonumber(ARGV[4])})
end
entry.live = {version = ARGV[2], semitones = tonumber(ARGV[3])}
if #draining == 0 then entry.draining = cjson.decode('[]') else entry.draining = draining end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(entry))
return cjson.encode(entry)
