-- A digest of the last message consumed before each stored position. When a
-- partition is assigned, the message before the position is read again and
-- compared: a topic deleted and created again, or a broker that lost its
-- data, may have grown past the old position with other messages, and those
-- below it would otherwise be taken for consumed. Positions stored before
-- this have no digest and are not compared.
ALTER TABLE consumer_offsets ADD COLUMN last_digest bytea;
