-- Forgets the local broker's consumer-group membership (members, leader,
-- assignments), never committed offsets or records. Run only while the broker
-- is stopped: it holds membership in memory and writes it back.
--
-- tansu 0.6.0 keeps membership in its storage, and a group whose leader
-- vanished (killed, and not back within the session timeout) keeps that
-- member as leader and never completes another rebalance, across broker
-- restarts too. Membership is live state that members rebuild by rejoining,
-- so forgetting it makes a broker restart the remedy.
DELETE FROM consumer_group_detail;
