-- Saves a user's choice unless the key holds a newer one.
--
-- KEYS[1]  the user's choice hash (fields at, d)
-- ARGV[1]  the choice's stamp (microseconds; exact in a Lua number up to 2^53)
-- ARGV[2]  the serialized choice
--
-- Returns 1 if written, 0 if the held choice is as new or newer. No expiry:
-- the choice must outlive the history, and it is one small hash per user who
-- ever chose.
local held = redis.call('HGET', KEYS[1], 'at')
if held and tonumber(held) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'at', ARGV[1], 'd', ARGV[2])
return 1
