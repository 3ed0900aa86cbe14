-- Durable state of one flow's embedded broker. Times are Unix seconds (wall clock), so
-- several processes on one host agree on them.
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- A topic's stored messages have the seqs after number << 40, up to head: each topic is one
-- range of `messages`, read in order by its subscriptions' cursors.
CREATE TABLE IF NOT EXISTS topics (
    name TEXT PRIMARY KEY,
    published INTEGER NOT NULL DEFAULT 0,
    number INTEGER,
    head INTEGER
);

CREATE TABLE IF NOT EXISTS subscriptions (
    name TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    config TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0,
    redelivered INTEGER NOT NULL DEFAULT 0,
    dead_lettered INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    -- Seq of the last message of its topic that a fetch took from the topic's range.
    cursor INTEGER
);

-- One row per stored message. A message in a topic's range stays until every subscription
-- of the topic is past it. Seqs up to 1 << 40 are messages of single subscriptions
-- (replayed dead letters, and messages of schema 1), and `holders` counts the delivery
-- rows that still need them.
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    topic TEXT NOT NULL,
    body BLOB NOT NULL,
    key TEXT,
    headers TEXT NOT NULL,
    published_at REAL NOT NULL,
    holders INTEGER NOT NULL DEFAULT 0
);

-- One row per (subscription, message) that left the plain path: a redelivery waiting or
-- leased, a message of an ordered subscription, a message of schema 1. leased = 1 while
-- a consumer has the row. visible_at is when an unleased row may be delivered, or when
-- a lease expires.
CREATE TABLE IF NOT EXISTS deliveries (
    subscription TEXT NOT NULL,
    seq INTEGER NOT NULL,
    key TEXT,
    leased INTEGER NOT NULL DEFAULT 0,
    lease INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    first_delivered_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (subscription, seq)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS deliveries_ready ON deliveries (subscription, leased, visible_at, seq);

-- One row per fetch from a topic's range that is not settled yet: the messages from
-- first_seq to last_seq, with bit i of `pending` (little-endian) set while first_seq + i
-- is unsettled. `low` is the lowest pending seq.
CREATE TABLE IF NOT EXISTS leases (
    subscription TEXT NOT NULL,
    lease INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    pending BLOB NOT NULL,
    low INTEGER NOT NULL,
    deadline REAL NOT NULL,
    fetched_at REAL NOT NULL,
    PRIMARY KEY (subscription, lease)
) WITHOUT ROWID;

-- Ids seen within the idempotency window, so a republished id is stored once.
CREATE TABLE IF NOT EXISTS seen_ids (
    id TEXT PRIMARY KEY,
    published_at REAL NOT NULL
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS seen_ids_time ON seen_ids (published_at);

-- A copy of every dead letter for `flowrun dlq`, kept until purged.
CREATE TABLE IF NOT EXISTS dead_letters (
    number INTEGER PRIMARY KEY AUTOINCREMENT,
    subscription TEXT NOT NULL,
    topic TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    key TEXT,
    headers TEXT NOT NULL,
    dead_lettered_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS producers (
    name TEXT PRIMARY KEY,
    finished INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
