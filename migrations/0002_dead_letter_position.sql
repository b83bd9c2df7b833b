-- Where in the dead-letter topic a partition's letters continue: letters of one
-- source partition go to one dead-letter partition, and a restart reads from
-- here to find letters an interrupted batch already sent, so none is sent twice.
ALTER TABLE consumer_offsets ADD COLUMN dlq_next_offset bigint CHECK (dlq_next_offset >= 0);
