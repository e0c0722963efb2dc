-- Appends history records of one user, once per version, and prunes what
-- fell out of the retention.
--
-- KEYS[1]      the user's history sorted set (score: version)
-- ARGV[1]      the retention in ms (also the key's expiry)
-- ARGV[2]      the horizon, Unix ms: records older than it go
-- ARGV[3 ..]   pairs of (version, serialized record)
--
-- Versions are clock-scaled (at least at_ms * 1000), so only records scored
-- below horizon * 1000 can be old; those are decoded to check their at_ms
-- before they go, which keeps records with small hand-made versions.
for i = 3, #ARGV, 2 do
  if redis.call('ZCOUNT', KEYS[1], ARGV[i], ARGV[i]) == 0 then
    redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
local horizon = tonumber(ARGV[2])
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', horizon * 1000))
for _, member in ipairs(old) do
  local ok, record = pcall(cjson.decode, member)
  if ok and type(record) == 'table' and tonumber(record.at_ms) and tonumber(record.at_ms) < horizon then
    redis.call('ZREM', KEYS[1], member)
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
