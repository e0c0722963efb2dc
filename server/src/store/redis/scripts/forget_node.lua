-- Forgets a node for good: its registration, lease, claim and slot bitmap.
-- The caller checked that its node index is empty.
--
-- KEYS[1]  the node registry hash
-- KEYS[2]  the node's lease
-- KEYS[3]  the claim on the node
-- KEYS[4]  the node's slot bitmap
-- ARGV[1]  the node id
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return 1
