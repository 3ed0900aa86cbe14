-- Durable state of one flow's embedded broker. Times are Unix seconds (wall clock), so
-- several processes on one host agree on them.
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS topics (
    name TEXT PRIMARY KEY,
    published INTEGER NOT NULL DEFAULT 0
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
    dropped INTEGER NOT NULL DEFAULT 0
);

-- One row per stored message; `holders` counts subscriptions that have not settled it.
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    topic TEXT NOT NULL,
    body BLOB NOT NULL,
    key TEXT,
    headers TEXT NOT NULL,
    published_at REAL NOT NULL,
    holders INTEGER NOT NULL
);

-- One row per unsettled (subscription, message). leased = 1 while a consumer holds it;
-- visible_at is when an unleased row may be delivered, or when a lease expires.
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
