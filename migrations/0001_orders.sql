-- Orders, normalized, plus the exact document as received (canonical JSON),
-- which the read path serves without reassembly and duplicate checks compare.

CREATE TABLE orders (
    order_uid          text        PRIMARY KEY CHECK (order_uid ~ '^[A-Za-z0-9_-]{1,64}$'),
    -- Ingest order; pages and warm-up walk it backwards.
    ingest_seq         bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    track_number       text        NOT NULL,
    entry              text        NOT NULL,
    locale             text        NOT NULL,
    internal_signature text        NOT NULL,
    customer_id        text        NOT NULL,
    delivery_service   text        NOT NULL,
    shardkey           text        NOT NULL,
    sm_id              bigint      NOT NULL CHECK (sm_id > 0),
    date_created       timestamptz NOT NULL,
    oof_shard          text        NOT NULL,
    document           text        NOT NULL,
    ingested_at        timestamptz NOT NULL DEFAULT now(),
    source_topic       text        NOT NULL,
    source_partition   integer     NOT NULL,
    source_offset      bigint      NOT NULL
);

CREATE INDEX orders_customer_idx ON orders (customer_id);
CREATE INDEX orders_track_number_idx ON orders (track_number);

CREATE TABLE deliveries (
    order_uid text PRIMARY KEY REFERENCES orders (order_uid) ON DELETE CASCADE,
    name      text NOT NULL,
    phone     text NOT NULL,
    zip       text NOT NULL,
    city      text NOT NULL,
    address   text NOT NULL,
    region    text NOT NULL,
    email     text NOT NULL
);

CREATE TABLE payments (
    order_uid     text    PRIMARY KEY REFERENCES orders (order_uid) ON DELETE CASCADE,
    transaction   text    NOT NULL,
    request_id    text    NOT NULL,
    currency      char(3) NOT NULL,
    provider      text    NOT NULL,
    amount        bigint  NOT NULL CHECK (amount >= 0),
    payment_dt    bigint  NOT NULL CHECK (payment_dt > 0),
    bank          text    NOT NULL,
    delivery_cost bigint  NOT NULL CHECK (delivery_cost >= 0),
    goods_total   bigint  NOT NULL CHECK (goods_total >= 0),
    custom_fee    bigint  NOT NULL CHECK (custom_fee >= 0)
);

CREATE INDEX payments_transaction_idx ON payments (transaction);

CREATE TABLE items (
    order_uid    text     NOT NULL REFERENCES orders (order_uid) ON DELETE CASCADE,
    -- Position in the order's items array, so the order reads back as sent.
    position     integer  NOT NULL CHECK (position >= 0),
    chrt_id      bigint   NOT NULL,
    track_number text     NOT NULL,
    price        bigint   NOT NULL CHECK (price >= 0),
    rid          text     NOT NULL,
    name         text     NOT NULL,
    sale         smallint NOT NULL CHECK (sale BETWEEN 0 AND 100),
    size         text     NOT NULL,
    total_price  bigint   NOT NULL CHECK (total_price >= 0),
    nm_id        bigint   NOT NULL,
    brand        text     NOT NULL,
    status       integer  NOT NULL,
    PRIMARY KEY (order_uid, position)
);

CREATE INDEX items_chrt_id_idx ON items (chrt_id);

-- The next offset to consume per partition, written in the same transaction as
-- the orders it covers: the source of truth on start and after every rebalance.
CREATE TABLE consumer_offsets (
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL CHECK (partition >= 0),
    next_offset bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);
