-- Many nodes' records and slot counts in one call, each node packed into one string (one
-- reply value per node, not twenty: parsing the reply is what a big fleet costs a reader).
-- KEYS: node hash, slot zset, per node (alternating). ARGV: the position of `state` and of
-- `model` among the fields, then the fields wanted.
-- Returns per node with a state: its model, then its row: the fields' values ('' where
-- unset), slots taken and slots live, joined by the unit separator (\31).
local state_at, model_at = tonumber(ARGV[1]), tonumber(ARGV[2])
local fields = {unpack(ARGV, 3)}
local out = {}
for i = 1, #KEYS, 2 do
  local row = redis.call('HMGET', KEYS[i], unpack(fields))
  for j = 1, #fields do
    if not row[j] then row[j] = '' end
  end
  if row[state_at] ~= '' then
    row[#fields + 1] = redis.call('ZCARD', KEYS[i + 1])
    row[#fields + 2] = redis.call('ZCOUNT', KEYS[i + 1], '+inf', '+inf')
    out[#out + 1] = row[model_at]
    out[#out + 1] = table.concat(row, '\31')
  end
end
return out
