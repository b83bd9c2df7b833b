-- Every dead letter, written in the same transaction as the offsets that move
-- past it, so the record is exact across crashes, like the orders. The full
-- original stays on the dead-letter topic; this holds its first bytes.
CREATE TABLE dead_letters (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL CHECK (source_partition >= 0),
    source_offset    bigint      NOT NULL CHECK (source_offset >= 0),
    message_key      bytea,
    -- Read from the message where one could be, even from an invalid order.
    order_uid        text        CHECK (length(order_uid) <= 128),
    stage            text        NOT NULL,
    reasons          jsonb       NOT NULL CHECK (jsonb_typeof(reasons) = 'array'),
    payload_bytes    bigint      NOT NULL CHECK (payload_bytes >= 0),
    payload_preview  bytea       NOT NULL,
    -- The letter this message was replayed from, as topic/partition/offset.
    replay_of        text,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    -- Several consumer groups may read one topic: one record per message.
    UNIQUE (source_topic, source_partition, source_offset)
);

CREATE INDEX dead_letters_order_uid_idx ON dead_letters (order_uid, id) WHERE order_uid IS NOT NULL;
CREATE INDEX dead_letters_key_idx ON dead_letters (message_key, id) WHERE message_key IS NOT NULL;
CREATE INDEX dead_letters_stage_idx ON dead_letters (stage, id);
CREATE INDEX dead_letters_time_idx ON dead_letters (dead_lettered_at);
