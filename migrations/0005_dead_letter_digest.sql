-- A topic deleted and created again, or a broker that lost its data, numbers its
-- messages from 0 again, so a new message can take the source position of one
-- already recorded. A digest of the message's bytes tells the two apart: each
-- gets its own record, while one message read by several consumer groups is
-- still recorded once. Letters recorded before this have no digest and never
-- match a new one.
ALTER TABLE dead_letters ADD COLUMN payload_digest bytea;
ALTER TABLE dead_letters
    DROP CONSTRAINT dead_letters_source_topic_source_partition_source_offset_key;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_source_message_key
    UNIQUE (source_topic, source_partition, source_offset, payload_digest);
