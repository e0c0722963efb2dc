-- Marks one member of a consumer group alive and lists the group's live
-- members, dropping those whose deadline passed.
--
-- KEYS[1]   the group's members hash (member -> deadline, Unix ms)
-- ARGV[1]   now, Unix ms
-- ARGV[2]   the member
-- ARGV[3]   its new deadline, Unix ms
--
-- Returns the live members (unsorted). The hash expires with its last
-- member, so a group nobody consumes leaves nothing behind.
local now = tonumber(ARGV[1])
local deadline = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if redis.call('PTTL', KEYS[1]) < deadline - now then
  redis.call('PEXPIRE', KEYS[1], deadline - now)
end
local fields = redis.call('HGETALL', KEYS[1])
local alive = {}
for i = 1, #fields, 2 do
  if tonumber(fields[i + 1]) > now then
    alive[#alive + 1] = fields[i]
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
return alive
