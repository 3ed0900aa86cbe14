"""Redis Streams broker: a flow's topics, subscriptions and retries on a Redis server (7.0+).

Several flows and several processes may share one server. Every key of a flow starts
with `{FLOW}`, a Redis Cluster hash tag, so one flow's keys live in one slot and the Lua
scripts below may touch several of them at once. Each process reads as its own consumer
(host, pid and a random suffix), so processes running the same subscription compete for
its messages.

| flowrun              | Redis                                                                  |
| -------------------- | ---------------------------------------------------------------------- |
| topic T              | stream `{FLOW}:topic:T`, one entry per message (XADD)                  |
| subscription S       | consumer group S on the topic stream, created at `$` with MKSTREAM,    |
|                      | plus the stream `{FLOW}:retry:S` (group S) that carries redeliveries   |
| fetch                | XREADGROUP `>` (retries first); BLOCK on both streams when idle        |
| ack                  | XACK                                                                   |
| ack timeout          | XAUTOCLAIM with min-idle = ack_timeout, in every fetch and on a timer  |
|                      | for this process's own deliveries                                      |
| backoff              | sorted set `{FLOW}:delayed:S` of record ids scored by due time (server |
|                      | ms), records in hashes `{FLOW}:record:S:ID`; due ones move to the      |
|                      | retry stream                                                           |
| delivery count       | field `deliveries` of a redelivered entry (deliveries so far) + 1      |
| dead letter          | XADD to the dead-letter topic's stream, and a copy for `flowrun dlq`   |
|                      | to the stream `{FLOW}:dead-letters`                                    |
| ordered              | hash `{FLOW}:owners:S` (key -> id of the message that has it); later   |
|                      | messages of the key wait as records listed in `{FLOW}:parked:S:KEY`    |
| max_pending          | size per subscription in the counters hash, checked before XADD        |
| counters             | hash `{FLOW}:counters`, changed in the Lua script of each operation    |
| producer states      | hash `{FLOW}:producers`                                                |
| message ids (dedup)  | key `{FLOW}:dedup:ID` with a TTL of dedup_window, checked and set in   |
|                      | the publish script                                                     |
| retention            | XTRIM MINID ~ to the oldest entry a group has not read or settled,     |
|                      | and XADD MAXLEN ~ when the option max_length is set                    |

A redelivery is a new entry in the retry stream, never the old entry claimed again. So a
tag from an earlier delivery cannot settle a later one, and ack timeouts get the same
backoff and dead-letter rules as nacks. The PEL's own delivery counter therefore stays at
1, and the count travels in the entry.

Counters, sizes and gauges live on the server and cover every process. Only the lease
timers, which expire this process's deliveries on time, and the record of which `ack:
none` deliveries were settled are kept per process.

Limits:

- `publish` returns once the server ran the script that stored the messages. Whether they
  survive a restart of the server depends on its persistence settings (appendonly,
  appendfsync), which flowrun does not change.
- Every id a publisher chose keeps a key for `dedup_window` (7 days by default), so memory grows
  with the publish rate times the window.
- Ack timeouts and delayed retries fire on time in the process that made the delivery or
  scheduled the retry. When that process is gone, the next fetch of the subscription in
  any process handles them, and a waiting fetch looks again at least once per ack timeout.
- `max_length` trims with `MAXLEN ~`, so a stream keeps at least that many entries and
  up to one node (100 entries by default) more.
- Under `ack: none` a message leaves on delivery and frees its key, so `ordered` orders
  deliveries but not their handling.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import math
import os
import socket
import struct
import uuid
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from flowrun.broker import (
    NO_ERROR,
    Broker,
    ErrorInfo,
    Nack,
    SubscriptionConfig,
    Topology,
    dead_letter_headers,
    replay_headers,
)
from flowrun.brokers import redact_url
from flowrun.brokers.options import RedisOptions
from flowrun.clock import SYSTEM_CLOCK, Clock
from flowrun.counters import Counters, Gauges, SubscriptionCounters
from flowrun.errors import BrokerError, QueueFullError
from flowrun.logs import RepeatLimiter
from flowrun.message import Delivery, Envelope
from flowrun.spec import AckPolicy, BrokerSpec, OnFull
from flowrun.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A lease timer fires this long after the ack timeout. The server stamps a delivery before
# the reply reaches us, so by then it counts the delivery as idle for the whole ack timeout.
LEASE_MARGIN_SECONDS = 0.005
# How often a publish blocked by a full subscription re-checks for acks of other processes.
# Acks of this process wake it at once.
CROSS_PROCESS_POLL_SECONDS = 0.05
# Each process trims settled entries from a stream at most this often.
TRIM_INTERVAL_SECONDS = 1.0
RETRY_AFTER_ERROR_SECONDS = 1.0
CONNECT_TIMEOUT_SECONDS = 10.0
# Envelopes stored per publish script, so one call does not hold up the server for long.
PUBLISH_BATCH = 500
# Timers of settled leases are dropped once the heap exceeds twice the live timers plus this.
TIMER_SLACK = 1024
# At close, consumers of other processes with no pending delivery and idle this long are deleted.
STALE_CONSUMER_MS = 3_600_000
TOPIC_STREAM = "t"
RETRY_STREAM = "r"
# Head of a packed envelope in the publish script's argument: flags (1: has a key, 2: has
# a dedup key), then the byte lengths of id, body, key, headers and published_at.
_ENVELOPE_HEAD = struct.Struct("<BIIIII")

# Helpers shared by the scripts.
_LUA_HELPERS = r"""
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

local function server_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
end
"""

# Scripts about one subscription start with this part.
# KEYS: counters, topic stream, retry stream, delayed set, owners hash, dead-letter topic
# stream, dead-letter archive. ARGV[1..6]: subscription, consumer, key prefix of the flow,
# topic, ordered (1/0), ack none (1/0).
_LUA_SUBSCRIPTION = r"""
local counters, topic_stream, retry_stream, delayed, owners = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local subscription, consumer, prefix, topic = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ordered, ack_none = ARGV[5] == '1', ARGV[6] == '1'

-- Counter changes add up here, and write_counts stores them once at the end of the call.
local counts = {}
local function count(name, amount)
  counts[name] = (counts[name] or 0) + amount
end

local function write_counts()
  for name, amount in pairs(counts) do
    if amount ~= 0 then
      redis.call('HINCRBY', counters, 'subscription:' .. subscription .. ':' .. name, amount)
    end
  end
  counts = {}
end

local function stream_of(kind)
  if kind == 't' then return topic_stream end
  return retry_stream
end

local function record_key(record)
  return prefix .. ':record:' .. subscription .. ':' .. record
end

local function parked_key(message_key)
  return prefix .. ':parked:' .. subscription .. ':' .. message_key
end

-- One delivery entry becomes at most one stored record, so its id names the record.
local function record_name(stream, entry_id)
  if stream == topic_stream then return 't' .. entry_id end
  return 'r' .. entry_id
end

-- Where each stored field goes in a delivery row (see `row`).
local ROW_SLOTS = {id = 3, body = 4, headers = 5, published_at = 6, key = 7, topic = 8, deliveries = 9,
                   first_delivered_at = 10}

-- An entry as the client reads it: kind (t|r), entry id, then id, body, headers,
-- published_at, key, topic, deliveries and first_delivered_at, false where absent. A
-- fixed order spares the client from building a dict per entry.
local function row(kind, entry_id, fields)
  local values = {kind, entry_id, false, false, false, false, false, false, false, false}
  for i = 1, #fields, 2 do
    local slot = ROW_SLOTS[fields[i]]
    if slot then values[slot] = fields[i + 1] end
  end
  return values
end

-- Topic entries lack the fields of a redelivery, so add them before storing the entry as a record.
local function as_record(stream, fields)
  if stream ~= topic_stream then return fields end
  local record = {'topic', topic, 'deliveries', '0', 'first_delivered_at', '0'}
  for i = 1, #fields do record[#record + 1] = fields[i] end
  return record
end

-- Hand a settled message's key to the oldest message parked behind it, or free the key.
local function release_key(message_key, message_id)
  if not message_key or redis.call('HGET', owners, message_key) ~= message_id then return end
  while true do
    local next_record = redis.call('LPOP', parked_key(message_key))
    if not next_record then
      redis.call('HDEL', owners, message_key)
      return
    end
    local fields = redis.call('HGETALL', record_key(next_record))
    redis.call('DEL', record_key(next_record))
    if #fields > 0 then
      redis.call('HSET', owners, message_key, field(fields, 'id'))
      redis.call('XADD', retry_stream, '*', unpack(fields))
      return
    end
  end
end

-- Count a read entry as delivered, or park it while an earlier message of its key is
-- unsettled (ordered subscriptions). `values` is the entry's row. Returns whether the
-- entry is delivered.
local function accept(stream, entry_id, fields, values)
  local message_key = values[7]
  if ordered and not ack_none and message_key then
    local message_id = values[3]
    local owner = redis.call('HGET', owners, message_key)
    if owner and owner ~= message_id then
      local record = record_name(stream, entry_id)
      redis.call('HSET', record_key(record), unpack(as_record(stream, fields)))
      redis.call('RPUSH', parked_key(message_key), record)
      redis.call('XACK', stream, subscription, entry_id)
      return false
    end
    redis.call('HSET', owners, message_key, message_id)
  end

  count('delivered', 1)
  if tonumber(values[9] or '0') > 0 then count('redelivered', 1) end
  -- ack: none is at-most-once: the message leaves the subscription as it is delivered.
  if ack_none then
    redis.call('XACK', stream, subscription, entry_id)
    count('size', -1)
  end
  return true
end
"""

# Claims expired deliveries, moves due retries to the retry stream and reads up to
# ARGV[7] messages. ARGV[8]: ack timeout in ms; then pairs (t|r, entry id) of deliveries
# of this consumer whose lease status the caller wants.
# Returns {claimed, lost, delivered, ms until the next retry is due or -1, lease statuses}.
# Claimed and delivered entries come as rows (see `row`).
_LUA_FETCH = r"""
local CLAIM_LIMIT, PROMOTE_LIMIT, SCAN_LIMIT = 100, 100, 1000
local maximum, min_idle = tonumber(ARGV[7]), tonumber(ARGV[8])

local claimed, lost = {}, 0
for _, kind in ipairs({'t', 'r'}) do
  local reply = redis.call('XAUTOCLAIM', stream_of(kind), subscription, consumer, min_idle, '0-0',
                           'COUNT', CLAIM_LIMIT)
  for _, entry in ipairs(reply[2]) do claimed[#claimed + 1] = row(kind, entry[1], entry[2]) end
  -- Entries trimmed from the stream while pending: their content is gone.
  lost = lost + #reply[3]
end
if lost > 0 then
  count('dropped', lost)
  count('size', -lost)
end

local now = server_ms()
for _, record in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, PROMOTE_LIMIT)) do
  local fields = redis.call('HGETALL', record_key(record))
  if #fields > 0 then
    redis.call('XADD', retry_stream, '*', unpack(fields))
  else
    count('dropped', 1)
    count('size', -1)
  end
  redis.call('DEL', record_key(record))
  redis.call('ZREM', delayed, record)
end

local delivered, scanned = {}, 0
for _, kind in ipairs({'r', 't'}) do
  local stream = stream_of(kind)
  while #delivered < maximum and scanned < SCAN_LIMIT do
    local reply = redis.call('XREADGROUP', 'GROUP', subscription, consumer, 'COUNT', maximum - #delivered,
                             'STREAMS', stream, '>')
    if not reply then break end
    for _, entry in ipairs(reply[1][2]) do
      scanned = scanned + 1
      local values = row(kind, entry[1], entry[2])
      if accept(stream, entry[1], entry[2], values) then delivered[#delivered + 1] = values end
    end
  end
end

local next_due = -1
local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if #first > 0 then next_due = math.max(math.ceil(tonumber(first[2]) - now), 0) end

local statuses = {}
for i = 9, #ARGV, 2 do
  local pending = redis.call('XPENDING', stream_of(ARGV[i]), subscription, ARGV[i + 1], ARGV[i + 1], 1)
  if #pending == 0 or pending[1][2] ~= consumer then
    statuses[#statuses + 1] = -1
  else
    statuses[#statuses + 1] = math.max(min_idle - pending[1][3], 0)
  end
end
write_counts()
return {claimed, lost, delivered, next_due, statuses}
"""

# Accepts entries that a blocking XREADGROUP returned: ARGV[7..] pairs (t|r, entry id).
# Returns a row (see `row`) per delivered entry and 0 per parked (or vanished) one.
_LUA_ACCEPT = r"""
local accepted = {}
for i = 7, #ARGV, 2 do
  local stream = stream_of(ARGV[i])
  local entries = redis.call('XRANGE', stream, ARGV[i + 1], ARGV[i + 1])
  local values = #entries > 0 and row(ARGV[i], ARGV[i + 1], entries[1][2])
  if values and accept(stream, ARGV[i + 1], entries[1][2], values) then
    accepted[#accepted + 1] = values
  else
    accepted[#accepted + 1] = 0
  end
end
write_counts()
return accepted
"""

# Settles deliveries. ARGV[7]: dead-letter topic, ARGV[8]: how many subscriptions it has,
# then their names, then the plain acks as one string of `t|r:entry-id` words separated
# by spaces (acks that free no key of an ordered subscription), then per other delivery:
# action (ack, retry, dead, drop), t|r, entry id, message id, has key (1/0), key, delay
# ms, field count, fields. A retry's fields are the record to requeue, a dead letter's
# the entry for the dead-letter topic. Plain acks travel as one argument because client
# libraries encode each argument separately, which cost more than the acks themselves.
# Returns, per other delivery, 1 if it was still pending (and is now settled) and 0 if
# it was stale. Plain acks get no result, because acking a stale delivery changes nothing.
_LUA_SETTLE = r"""
local dead_stream, archive = KEYS[6], KEYS[7]
local dead_topic, dead_count = ARGV[7], tonumber(ARGV[8])

local function dead_letter(fields, message_id)
  if dead_count > 0 then
    redis.call('XADD', dead_stream, '*', unpack(fields))
    for i = 1, dead_count do
      redis.call('HINCRBY', counters, 'subscription:' .. ARGV[8 + i] .. ':size', 1)
    end
  end
  redis.call('HINCRBY', counters, 'topic:' .. dead_topic .. ':published', 1)
  local number = redis.call('HINCRBY', counters, 'dead-letters:number', 1)
  redis.call('XADD', archive, '*', 'number', number, 'subscription', subscription, 'topic', topic,
             'message_id', message_id, 'dead_lettered_at', field(fields, 'published_at'), unpack(fields))
  count('dead_lettered', 1)
end

-- Sizes and acks are counted once per call.
local results, now, settled, acked = {}, nil, 0, 0
-- Plain acks go in one XACK per stream, which returns how many were still pending. Ids
-- go in chunks so that unpack stays within Lua's stack limit.
local plain = {t = {}, r = {}}
for kind, entry_id in string.gmatch(ARGV[9 + dead_count], '([tr]):(%S+)') do
  plain[kind][#plain[kind] + 1] = entry_id
end
for kind, ids in pairs(plain) do
  for start = 1, #ids, 1000 do
    local pending = redis.call('XACK', stream_of(kind), subscription, unpack(ids, start, math.min(start + 999, #ids)))
    settled = settled + pending
    acked = acked + pending
  end
end

local i = 10 + dead_count
while i <= #ARGV do
  local action, stream, entry_id, message_id = ARGV[i], stream_of(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3]
  local message_key = ARGV[i + 4] == '1' and ARGV[i + 5]
  local delay, field_count = tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7])
  local fields = {}
  for j = 1, field_count do fields[j] = ARGV[i + 7 + j] end
  i = i + 8 + field_count

  local held = redis.call('XACK', stream, subscription, entry_id) == 1
  results[#results + 1] = held and 1 or 0
  if held and action == 'retry' then
    -- The message keeps its key (ordered) until it is finally settled.
    if delay <= 0 then
      redis.call('XADD', retry_stream, '*', unpack(fields))
    else
      now = now or server_ms()
      local record = record_name(stream, entry_id)
      redis.call('HSET', record_key(record), unpack(fields))
      redis.call('ZADD', delayed, now + delay, record)
    end
  elseif held then
    settled = settled + 1
    if action == 'ack' then
      acked = acked + 1
    elseif action == 'drop' then
      count('dropped', 1)
    else
      dead_letter(fields, message_id)
    end
    release_key(message_key, message_id)
  end
end
count('size', -settled)
count('acked', acked)
write_counts()
return results
"""

# Publishes envelopes of one topic in order, stopping at the first full subscription.
# KEYS: counters, topic stream, then one dedup key per envelope whose publisher chose its
# id, in envelope order. ARGV: topic, dedup window ms, max length (0: none), subscription
# count, per subscription (name, max_pending), then every envelope packed into one string.
# Each packed envelope (see _pack_envelope) is its flags (1: has a key, 2: has a dedup
# key), the byte lengths of id, body, key, headers and published_at, then those values.
# One argument for the batch saves the client encoding seven arguments per envelope.
# Returns {envelopes handled} or, at a full subscription, {handled, name, size}.
_LUA_PUBLISH = r"""
local counters, stream = KEYS[1], KEYS[2]
local topic, window, max_length = ARGV[1], ARGV[2], tonumber(ARGV[3])
local subscriptions, names, limits, sizes = tonumber(ARGV[4]), {}, {}, {}
for s = 1, subscriptions do
  names[s] = 'subscription:' .. ARGV[3 + 2 * s] .. ':size'
  limits[s] = tonumber(ARGV[4 + 2 * s])
  sizes[s] = tonumber(redis.call('HGET', counters, names[s]) or '0')
end

-- Counters change once per call, by the number of envelopes stored.
local stored, published = 0, 0
local function write_counts()
  if stored > 0 then
    for s = 1, subscriptions do redis.call('HINCRBY', counters, names[s], stored) end
  end
  if published > 0 then redis.call('HINCRBY', counters, 'topic:' .. topic .. ':published', published) end
end

-- Stores one envelope in the topic stream; key is false when the envelope has none.
local NO_FIELDS = {}
local function add(id, body, headers, published_at, key)
  local key_fields = key and {'key', key} or NO_FIELDS
  if max_length > 0 then
    redis.call('XADD', stream, 'MAXLEN', '~', max_length, '*', 'id', id, 'body', body, 'headers', headers,
               'published_at', published_at, unpack(key_fields))
  else
    redis.call('XADD', stream, '*', 'id', id, 'body', body, 'headers', headers, 'published_at', published_at,
               unpack(key_fields))
  end
end

local packed, sub = ARGV[5 + 2 * subscriptions], string.sub
local pos, e, dedup_keys = 1, 0, 0
while pos <= #packed do
  e = e + 1
  local flags, id_length, body_length, key_length, headers_length, at_length, start =
    struct.unpack('<BI4I4I4I4I4', packed, pos)
  local body_start = start + id_length
  local key_start = body_start + body_length
  local headers_start = key_start + key_length
  local at_start = headers_start + headers_length
  pos = at_start + at_length
  local dedup = false
  if flags >= 2 then
    dedup_keys = dedup_keys + 1
    dedup = KEYS[2 + dedup_keys]
  end
  if not dedup or redis.call('EXISTS', dedup) == 0 then
    for s = 1, subscriptions do
      if sizes[s] >= limits[s] then
        write_counts()
        return {e - 1, ARGV[3 + 2 * s], sizes[s]}
      end
    end
    if dedup then redis.call('SET', dedup, '1', 'PX', window) end
    if subscriptions > 0 then
      add(sub(packed, start, body_start - 1), sub(packed, body_start, key_start - 1),
          sub(packed, headers_start, at_start - 1), sub(packed, at_start, pos - 1),
          flags % 2 == 1 and sub(packed, key_start, headers_start - 1))
      for s = 1, subscriptions do sizes[s] = sizes[s] + 1 end
      stored = stored + 1
    end
    published = published + 1
  end
end
write_counts()
return {e}
"""

# Reads every counter and, per subscription (ARGV: name, topic stream, retry stream,
# delayed set), its deliveries in flight, delayed retries and the published_at of the
# oldest unread entry of each stream ('' when none), as one consistent snapshot.
_LUA_STATS = r"""
local function group_state(stream, group)
  if redis.call('EXISTS', stream) == 0 then return 0, false end
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    if field(info, 'name') == group then return field(info, 'pending'), field(info, 'last-delivered-id') end
  end
  return 0, false
end

local report = {redis.call('HGETALL', KEYS[1])}
for i = 1, #ARGV, 4 do
  local in_flight, oldest = 0, {}
  for _, stream in ipairs({ARGV[i + 1], ARGV[i + 2]}) do
    local pending, last_id = group_state(stream, ARGV[i])
    in_flight = in_flight + pending
    local unread = {}
    if last_id then unread = redis.call('XRANGE', stream, '(' .. last_id, '+', 'COUNT', 1) end
    oldest[#oldest + 1] = (#unread > 0 and field(unread[1][2], 'published_at')) or ''
  end
  report[#report + 1] = {in_flight, redis.call('ZCARD', ARGV[i + 3]), oldest[1], oldest[2]}
end
return report
"""

# Trims KEYS[1] up to the oldest entry that some consumer group has not read or settled.
_LUA_TRIM = r"""
local function before(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  a_ms, a_seq, b_ms, b_seq = tonumber(a_ms), tonumber(a_seq), tonumber(b_ms), tonumber(b_seq)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end

if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local keep = nil
for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local oldest = field(info, 'last-delivered-id')
  if field(info, 'pending') > 0 then
    local first_pending = redis.call('XPENDING', KEYS[1], field(info, 'name'))[2]
    if before(first_pending, oldest) then oldest = first_pending end
  end
  if keep == nil or before(oldest, keep) then keep = oldest end
end
if keep == nil then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', keep)
"""

# Deletes consumer ARGV[2] from group ARGV[1] of each stream in KEYS where it has no pending
# delivery, and other consumers without pending deliveries that were idle over ARGV[3] ms.
_LUA_RELEASE_CONSUMERS = r"""
local removed = 0
for _, stream in ipairs(KEYS) do
  if redis.call('EXISTS', stream) == 1 then
    local consumers = redis.pcall('XINFO', 'CONSUMERS', stream, ARGV[1])
    if consumers.err == nil then
      for _, info in ipairs(consumers) do
        local name = field(info, 'name')
        if field(info, 'pending') == 0 and (name == ARGV[2] or field(info, 'idle') > tonumber(ARGV[3])) then
          removed = removed + redis.call('XGROUP', 'DELCONSUMER', stream, ARGV[1], name)
        end
      end
    end
  end
end
return removed
"""

# Moves dead letter ARGV[1] of the archive KEYS[1] to the retry stream KEYS[2] of
# subscription ARGV[2] (sizes in KEYS[3]), with fields ARGV[3..]. Returns 0 if it is gone.
_LUA_REPLAY = r"""
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('HINCRBY', KEYS[3], 'subscription:' .. ARGV[2] .. ':size', 1)
return 1
"""

SCRIPTS = {
    "fetch": _LUA_HELPERS + _LUA_SUBSCRIPTION + _LUA_FETCH,
    "accept": _LUA_HELPERS + _LUA_SUBSCRIPTION + _LUA_ACCEPT,
    "settle": _LUA_HELPERS + _LUA_SUBSCRIPTION + _LUA_SETTLE,
    "publish": _LUA_PUBLISH,
    "stats": _LUA_HELPERS + _LUA_STATS,
    "trim": _LUA_HELPERS + _LUA_TRIM,
    "release_consumers": _LUA_HELPERS + _LUA_RELEASE_CONSUMERS,
    "replay": _LUA_REPLAY,
}


class _Tag(NamedTuple):
    """One delivery: its subscription, the stream it came from (t: topic, r: retry), the entry id.

    Subscriptions of one topic read the same entries, so the entry id alone is not enough.
    A tuple, because tags are hashed several times per delivery and a tuple hashes in C.
    """

    subscription: str
    stream: str
    entry_id: str


@dataclass(slots=True)
class _Lease:
    delivery: Delivery
    deadline: float


@dataclass
class _Settlement:
    """The outcome of one delivery: ack, retry (now or after `delay`), dead (letter) or drop."""

    action: str
    delivery: Delivery
    delay: float = 0.0
    fields: list[str | bytes] = field(default_factory=list)
    error: ErrorInfo | None = None


class _Names:
    """Key names of one flow. `{FLOW}` is a hash tag, so all of them share a cluster slot.

    Scripts also build record and parked-list keys from the prefix instead of receiving
    them in KEYS, which a cluster accepts only because they share that slot.
    """

    def __init__(self, flow_name: str) -> None:
        self.prefix = "{" + flow_name + "}"
        self.counters = f"{self.prefix}:counters"
        self.producers = f"{self.prefix}:producers"
        self.subscriptions = f"{self.prefix}:subscriptions"
        self.dead_letters = f"{self.prefix}:dead-letters"

    def topic(self, name: str) -> str:
        return f"{self.prefix}:topic:{name}"

    def retry(self, subscription: str) -> str:
        return f"{self.prefix}:retry:{subscription}"

    def delayed(self, subscription: str) -> str:
        return f"{self.prefix}:delayed:{subscription}"

    def owners(self, subscription: str) -> str:
        return f"{self.prefix}:owners:{subscription}"

    def dedup(self, message_id: str) -> str:
        return f"{self.prefix}:dedup:{message_id}"

    def scan_pattern(self) -> str:
        escaped = "".join("\\" + char if char in "*?[]\\" else char for char in self.prefix)
        return escaped + ":*"


class RedisBroker(Broker):
    """Broker on Redis Streams, shared by every process that runs the flow against one server."""

    backend = "redis"

    def __init__(self, url: str, flow_name: str, clock: Clock = SYSTEM_CLOCK, max_length: int | None = None,
                 dedup_window: float = 7 * 24 * 3600.0) -> None:
        super().__init__(clock)
        self.url = url
        self.flow_name = flow_name
        self.max_length = max_length
        self.dedup_window = dedup_window
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._password = urlsplit(url).password
        self._names = _Names(flow_name)
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._configs: dict[str, SubscriptionConfig] = {}
        self._by_topic: dict[str, list[SubscriptionConfig]] = {}
        self._leases: dict[str, dict[_Tag, _Lease]] = {}
        self._unsettled: dict[str, dict[_Tag, Delivery]] = {}
        self._surplus: dict[str, deque[Delivery]] = {}
        # A lease timer lists the tags of one fetched batch, which share a deadline. A timer
        # with None in place of tags runs when the subscription's next delayed retry is due.
        self._timers: list[tuple[float, int, str, tuple[_Tag, ...] | None]] = []
        self._script_heads: dict[str, tuple[list[bytes], list[bytes]]] = {}
        self._promotions: dict[str, float] = {}
        self._sequence = itertools.count()
        self._timer_changed = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self._blocked_reads: set[asyncio.Task[Any]] = set()
        self._room = asyncio.Event()
        self._untrimmed: set[str] = set()
        self._trim_at: float | None = None
        self._trimmed_at = -math.inf
        self._errors = RepeatLimiter(logger, clock)
        self._closed = False
        self._started = False

    @classmethod
    def from_spec(cls, spec: BrokerSpec, options: RedisOptions, flow_path: Path, flow_name: str,
                  clock: Clock) -> RedisBroker:
        if not spec.url:
            raise BrokerError("the redis backend needs broker.url in the flow or FLOWRUN_BROKER_URL")
        return cls(spec.url, flow_name, clock, options.max_length, options.dedup_window)

    # Lifecycle

    async def start(self, topology: Topology) -> None:
        """Connect, declare every topic and subscription, and start the lease timers."""
        self._index(topology)
        self._check_max_length()
        await self._connect()
        await self._declare()
        self._started = True
        self._timer_task = asyncio.create_task(self._run_timers(), name="flowrun-redis-timers")
        logger.info("redis broker on %s started flow '%s' as consumer %s", redact_url(self.url), self.flow_name,
                    self.consumer)

    async def open_for_inspection(self, topology: Topology | None) -> None:
        """Connect without declaring or consuming anything, for `flowrun status` and `flowrun dlq`."""
        if topology is not None:
            self._index(topology)
        await self._connect()

    async def close(self) -> None:
        """Stop timers and blocked fetches, and delete this process's consumer where nothing is pending."""
        if self._closed:
            return
        self._closed = True
        self._room.set()
        await cancel_and_wait(self._timer_task)
        self._timer_task = None
        for read in list(self._blocked_reads):
            read.cancel()
        await asyncio.gather(*self._blocked_reads, return_exceptions=True)

        if self._client is None:
            return
        try:
            # A broker that never started created no consumer (and may have no connection).
            if self._started:
                await self._release_consumers()
        except BrokerError as error:
            logger.warning("could not remove consumer %s from the flow's groups: %s", self.consumer, error)
        self._errors.flush()
        await self._client.aclose()
        self._client = None

    async def delete_flow_resources(self) -> None:
        """Delete every key of the flow on the server: streams, groups, counters, dead letters.

        The broker can only be closed afterwards.
        """
        await cancel_and_wait(self._timer_task)
        self._timer_task = None
        client = self._connected()
        try:
            keys = [key async for key in client.scan_iter(match=self._names.scan_pattern(), count=1000)]
        except RedisError as error:
            raise self._error("list the flow's keys", error) from None
        deleted = 0
        for start in range(0, len(keys), 1000):
            deleted += await self._run("delete the flow's keys", client.unlink(*keys[start:start + 1000]))
        logger.info("deleted %d keys of flow '%s' on %s", deleted, self.flow_name, redact_url(self.url))

    def _index(self, topology: Topology) -> None:
        self.topology = topology
        self.flow_name = topology.flow_name
        self._names = _Names(topology.flow_name)
        self._script_heads = {}
        self._configs = {config.name: config for config in topology.subscriptions}
        self._by_topic = {topic: [] for topic in topology.topics}
        for config in topology.subscriptions:
            self._by_topic.setdefault(config.topic, []).append(config)
            self._leases[config.name] = {}
            self._unsettled[config.name] = {}
            self._surplus[config.name] = deque()

    def _check_max_length(self) -> None:
        """Reject a max_length that could trim messages that a subscription has not read yet."""
        if self.max_length is None:
            return
        too_small = [config for config in self._configs.values() if config.max_pending > self.max_length]
        if too_small:
            names = ", ".join(f"'{config.name}' ({config.max_pending})" for config in too_small)
            raise BrokerError(
                f"broker option max_length ({self.max_length}) is below the max_pending of subscriptions {names}, "
                "so unread messages could be trimmed away; raise max_length or lower max_pending"
            )

    async def _connect(self) -> None:
        # TODO: Redis Cluster needs redis.asyncio.RedisCluster; this standalone client would
        # get MOVED errors from a cluster node.
        # No socket timeout: redis-py 8 (default 5 s) would cut blocking reads longer than
        # it, and sends under a timeout go through asyncio.wait_for, which in Python 3.11
        # swallows a cancellation. TCP keepalive notices a dead server instead. RESP2 keeps
        # reply shapes the same across redis-py versions (redis-py 8 defaults to RESP3).
        client = aioredis.Redis.from_url(
            self.url, protocol=2, decode_responses=False, socket_timeout=None,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_keepalive=True, socket_keepalive_options=_keepalive_options(),
            client_name=f"flowrun:{self.flow_name}:{self.consumer}",
        )
        self._client = client
        self._scripts = {name: client.register_script(text) for name, text in SCRIPTS.items()}
        info = await self._run("connect", client.info("server"))
        version = str(info.get("redis_version", "0"))
        if int(version.split(".")[0]) < 7:
            raise BrokerError(f"the redis backend needs Redis 7.0 or newer, but {redact_url(self.url)} runs "
                              f"{version}; upgrade the server")

    async def _declare(self) -> None:
        """Create each subscription's groups at `$` and store its settings, after checking the stored ones."""
        client = self._connected()
        stored = cast(dict[bytes, bytes],
                      await self._run("read the subscriptions", client.hgetall(self._names.subscriptions)))
        stored_settings = {name.decode(): json.loads(value) for name, value in stored.items()}
        self._check_settings(stored_settings)

        for config in self._configs.values():
            await self._create_group(self._names.topic(config.topic), config.name)
            await self._create_group(self._names.retry(config.name), config.name)
        settings: dict[Any, Any] = {name: json.dumps(_settings(config), sort_keys=True)
                                    for name, config in self._configs.items()}
        if settings:
            await self._run("store the subscriptions", client.hset(self._names.subscriptions, mapping=settings))

    def _check_settings(self, stored: dict[str, dict[str, Any]]) -> None:
        """Raise if a subscription moved to another topic, and log other changed settings, which take effect."""
        for name, config in self._configs.items():
            old = stored.get(name)
            if old is None:
                continue
            if old.get("topic") != config.topic:
                names = self._names
                raise BrokerError(
                    f"subscription '{name}' consumes topic '{old.get('topic')}' on {redact_url(self.url)}, but the "
                    f"flow now says '{config.topic}'; rename the subscriber, or drop its unsettled messages and "
                    f"state with XGROUP DESTROY {names.topic(str(old.get('topic')))} {name}, "
                    f"DEL {names.retry(name)} {names.delayed(name)} {names.owners(name)}, "
                    f"HDEL {names.counters} subscription:{name}:size and HDEL {names.subscriptions} {name}"
                )
            changes = _differences(old, _settings(config))
            if changes:
                # NOTE: a process started with the old settings keeps applying them until it restarts.
                logger.warning("subscription '%s' of flow '%s' changed on %s: %s; the new settings apply",
                               name, self.flow_name, redact_url(self.url), ", ".join(changes))

        for name in sorted(set(stored) - set(self._configs)):
            topic = stored[name].get("topic")
            logger.warning(
                "subscription '%s' is on %s but no longer in flow '%s'; its group keeps every message of topic "
                "'%s' on the server until you delete it with XGROUP DESTROY %s %s",
                name, redact_url(self.url), self.flow_name, topic, self._names.topic(str(topic)), name,
            )

    async def _create_group(self, stream: str, group: str) -> None:
        try:
            await self._connected().xgroup_create(stream, group, id="$", mkstream=True)
        except ResponseError as error:
            if not str(error).startswith("BUSYGROUP"):
                raise self._error(f"create consumer group '{group}' on {stream}", error) from None
        except RedisError as error:
            raise self._error(f"create consumer group '{group}' on {stream}", error) from None

    async def _release_consumers(self) -> None:
        for config in self._configs.values():
            streams = [self._names.topic(config.topic), self._names.retry(config.name)]
            await self._run("remove this process's consumer", self._scripts["release_consumers"](
                keys=streams, args=[config.name, self.consumer, STALE_CONSUMER_MS]))

    # Publishing

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Store envelopes in order, each once per id within the dedup window.

        A full subscription makes the call wait (`on_full: block`) or raise `QueueFullError`
        (`reject`), and envelopes before the full one stay published. The bound is exact
        across processes because the size check and the XADD run in one script. Dead letters
        skip it. A waiting publish wakes at once on settlements in this process and re-checks
        every CROSS_PROCESS_POLL_SECONDS for those of other processes.
        """
        start = 0
        while start < len(envelopes):
            topic = envelopes[start].topic
            end = start
            while end < len(envelopes) and envelopes[end].topic == topic:
                end += 1
            await self._publish_topic(topic, list(envelopes[start:end]))
            start = end

    async def _publish_topic(self, topic: str, envelopes: list[Envelope]) -> None:
        subscriptions = self._by_topic.get(topic)
        if subscriptions is None:
            raise BrokerError(f"topic '{topic}' is not declared on the broker")

        # Envelopes are packed once: a publish that waits for room sends the rest again.
        packed = [_pack_envelope(envelope) for envelope in envelopes]
        dedup_keys = [self._names.dedup(envelope.id) if envelope.dedupe else None for envelope in envelopes]
        start = 0
        while start < len(envelopes):
            self._check_open()
            self._room.clear()
            end = start + PUBLISH_BATCH
            script = self._publish_script(topic, subscriptions, packed[start:end], dedup_keys[start:end])
            reply = await self._run(f"publish to topic '{topic}'", script)
            start += int(reply[0])
            if len(reply) == 1:
                continue

            name, size = reply[1].decode(), int(reply[2])
            config = self._configs[name]
            if config.on_full is OnFull.REJECT:
                raise QueueFullError(
                    f"subscription '{name}' of topic '{topic}' is full: {size} unsettled messages reach its "
                    f"max_pending of {config.max_pending}; retry later or raise max_pending"
                )
            await self.clock.wait(self._room, CROSS_PROCESS_POLL_SECONDS)
            if self._closed:
                raise BrokerError(f"the Redis broker closed while a publish to topic '{topic}' waited for room in "
                                  f"subscription '{name}'")

    def _publish_script(self, topic: str, subscriptions: list[SubscriptionConfig], packed: list[bytes],
                        dedup_keys: list[str | None]) -> Awaitable[Any]:
        keys = [self._names.counters, self._names.topic(topic), *[key for key in dedup_keys if key is not None]]
        args: list[Any] = [topic, int(self.dedup_window * 1000), self.max_length or 0, len(subscriptions)]
        for config in subscriptions:
            args += [config.name, config.max_pending]
        args.append(b"".join(packed))
        return self._scripts["publish"](keys=keys, args=args)

    # Fetching

    async def fetch(self, subscription: str, max_messages: int, timeout: float) -> list[Delivery]:
        """Return up to `max_messages` deliveries, blocking on the streams up to `timeout` for the first."""
        config = self._config(subscription)
        deadline = self.clock.monotonic() + timeout
        surplus = self._take_surplus(config, max_messages)
        if surplus:
            return surplus

        try:
            return await self._poll(config, max_messages, deadline)
        except BrokerError:
            if self._closed:
                return []
            raise

    async def _poll(self, config: SubscriptionConfig, max_messages: int, deadline: float) -> list[Delivery]:
        while not self._closed:
            deliveries, next_due = await self._read_ready(config, max_messages)
            if deliveries:
                return deliveries

            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return []
            # Wake for the next due retry and, at the latest after one ack timeout, for
            # deliveries of other processes that expired.
            wait = min(remaining, config.ack_timeout, math.inf if next_due is None else next_due)
            if wait >= 0.001:
                deliveries = await self._read_blocking(config, max_messages, wait)
                if deliveries:
                    return deliveries
        return []

    async def _read_ready(self, config: SubscriptionConfig, max_messages: int) -> tuple[list[Delivery], float | None]:
        """Expire idle deliveries, promote due retries and read what is ready, without blocking."""
        claimed, lost, delivered, next_due, _ = await self._subscription_script(
            "fetch", config, [max_messages, _milliseconds(config.ack_timeout)])
        await self._expire(config, claimed)
        self._log_lost(config, lost)

        now = self.clock.wall()
        deliveries = [self._delivery(config, row, now) for row in delivered]
        self._track(config, deliveries)
        self._schedule_promotion(config.name, next_due)
        return deliveries, None if next_due < 0 else next_due / 1000

    async def _read_blocking(self, config: SubscriptionConfig, max_messages: int, seconds: float) -> list[Delivery]:
        """Block in XREADGROUP on the retry and topic streams until an entry arrives or `seconds` pass."""
        # The read runs as its own task so that close() can cancel it. redis-py then drops the
        # connection instead of returning it to the pool in the middle of a reply.
        # NOTE: entries that the server delivered just before a cancellation stay pending
        # without having been counted as delivered, and come back after the ack timeout.
        read = asyncio.create_task(self._xreadgroup(config, max_messages, max(int(seconds * 1000), 1)))
        self._blocked_reads.add(read)
        try:
            await asyncio.wait({read})
        finally:
            self._blocked_reads.discard(read)
            if not read.done():
                read.cancel()
                await asyncio.gather(read, return_exceptions=True)
        if read.cancelled():
            return []
        reply = await self._run(f"read subscription '{config.name}'", read)

        retry_stream = self._names.retry(config.name).encode()
        entries = [(RETRY_STREAM if stream == retry_stream else TOPIC_STREAM, entry_id)
                   for stream, items in reply for entry_id, _ in items]
        if not entries:
            return []
        accepted = await self._subscription_script(
            "accept", config, [part for entry in entries for part in entry])

        now = self.clock.wall()
        deliveries = [self._delivery(config, row, now) for row in accepted if row]
        self._track(config, deliveries)
        # One reply can hold up to max_messages entries of each stream. The surplus is
        # leased already, so the next fetch returns it first.
        self._surplus[config.name].extend(deliveries[max_messages:])
        return deliveries[:max_messages]

    async def _xreadgroup(self, config: SubscriptionConfig, count: int, block_ms: int) -> list[Any]:
        streams: dict[Any, Any] = {self._names.retry(config.name): ">", self._names.topic(config.topic): ">"}
        reply = await self._connected().xreadgroup(config.name, self.consumer, streams, count=count, block=block_ms)
        # RESP3 clients return {stream: [entries]}, RESP2 clients [[stream, entries], ...].
        if isinstance(reply, dict):
            return [[stream, entries] for stream, entries in reply.items()]
        return cast(list[Any], reply)

    def _take_surplus(self, config: SubscriptionConfig, max_messages: int) -> list[Delivery]:
        surplus = self._surplus[config.name]
        taken: list[Delivery] = []
        while surplus and len(taken) < max_messages:
            delivery = surplus.popleft()
            if delivery.tag in self._leases[config.name] or delivery.tag in self._unsettled[config.name]:
                taken.append(delivery)
        return taken

    @staticmethod
    def _delivery(config: SubscriptionConfig, row: list[Any], first_delivered_at: float) -> Delivery:
        """Build a delivery from a script's row, stamped `first_delivered_at` unless the entry has that time."""
        kind, entry_id, message_id, body, headers, published_at, key, topic, deliveries, first = row
        envelope = Envelope(
            message_id.decode(), config.topic if topic is None else topic.decode(), body,
            None if key is None else key.decode(), _headers_of(headers), float(published_at),
        )
        count = 1 if deliveries is None else int(deliveries) + 1
        first_at = (first is not None and float(first)) or first_delivered_at
        return Delivery(envelope, config.name, count, _Tag(config.name, kind.decode(), entry_id.decode()), first_at)

    def _track(self, config: SubscriptionConfig, deliveries: list[Delivery]) -> None:
        """Record this process's deliveries: each gets a lease timer, or under ack: none one settlement."""
        if config.ack is AckPolicy.NONE:
            self._unsettled[config.name].update((delivery.tag, delivery) for delivery in deliveries)
            if deliveries:
                self._room.set()
            return

        if not deliveries:
            return
        deadline = self.clock.monotonic() + config.ack_timeout + LEASE_MARGIN_SECONDS
        leases = self._leases[config.name]
        for delivery in deliveries:
            leases[delivery.tag] = _Lease(delivery, deadline)
        # The batch shares one deadline, so one timer covers it.
        self._push_timer(deadline, config.name, tuple(delivery.tag for delivery in deliveries))

    # Settling

    async def ack(self, subscription: str, tags: Sequence[Any]) -> None:
        """Settle deliveries as done, ignoring unknown, repeated or expired tags."""
        config = self._config(subscription)
        if config.ack is AckPolicy.NONE:
            await self._count_unsettled(config, tags, "acked")
            return

        leases = self._leases[subscription]
        known = [tag for tag in dict.fromkeys(tags) if tag in leases]
        if not config.ordered:
            await self._settle(config, known, [])
            return
        # An ack that frees a key of an ordered subscription goes through the full settlement.
        plain = [tag for tag in known if leases[tag].delivery.envelope.key is None]
        keyed = [_Settlement("ack", leases[tag].delivery) for tag in known
                 if leases[tag].delivery.envelope.key is not None]
        await self._settle(config, plain, keyed)

    async def nack(self, subscription: str, nacks: Sequence[Nack]) -> None:
        """Schedule redeliveries after their delay or backoff, or dead-letter or drop used-up messages."""
        config = self._config(subscription)
        if config.ack is AckPolicy.NONE:
            dropped = await self._count_unsettled(config, [nack.tag for nack in nacks], "dropped")
            for nack in nacks:
                if nack.tag in dropped:
                    logger.warning("dropped message %s of subscription '%s' (ack: none): %s",
                                   dropped[nack.tag].envelope.id, subscription,
                                   (nack.error or NO_ERROR).message)
            return

        leases = self._leases[subscription]
        settlements = []
        for nack in nacks:
            lease = leases.get(nack.tag)
            if lease is None:
                logger.debug("ignored nack of unknown or expired delivery %s on '%s'", nack.tag, subscription)
                continue
            settlements.append(self._failure(config, lease.delivery, nack.delay, nack.error, nack.terminal,
                                             nack.dead_letter))
        await self._settle(config, [], settlements)

    async def _count_unsettled(self, config: SubscriptionConfig, tags: Sequence[Any],
                               counter: str) -> dict[_Tag, Delivery]:
        """Count ack: none settlements and return the deliveries they settled.

        Nothing else changes, because these messages left the subscription when they were delivered.
        """
        unsettled = self._unsettled[config.name]
        known = {tag: unsettled[tag] for tag in tags if tag in unsettled}
        if not known:
            return known
        field_name = f"subscription:{config.name}:{counter}"
        await self._run(f"count {counter} on '{config.name}'",
                        self._connected().hincrby(self._names.counters, field_name, len(known)))
        self._forget_all(config.name, list(known))
        self._request_trim(config)
        return known

    def _failure(self, config: SubscriptionConfig, delivery: Delivery, delay: float | None, error: ErrorInfo | None,
                 terminal: bool, dead_letter: bool) -> _Settlement:
        """Decide what a failed delivery becomes: a retry, a dead letter or a drop."""
        exhausted = delivery.delivery_count >= config.max_deliveries
        if terminal or exhausted:
            if config.dead_letter is None or not dead_letter:
                return _Settlement("drop", delivery, error=error)
            now = self.clock.wall()
            headers = dead_letter_headers(delivery, config, error, now)
            original = delivery.envelope
            letter = Envelope(uuid.uuid4().hex, config.dead_letter, original.body, original.key, headers, now)
            return _Settlement("dead", delivery, fields=_entry_fields(letter), error=error)

        wait = config.backoff(delivery.delivery_count) if delay is None else max(delay, 0.0)
        return _Settlement("retry", delivery, wait, _record_fields(delivery), error)

    async def _settle(self, config: SubscriptionConfig, plain: list[_Tag], others: list[_Settlement]) -> None:
        """Apply settlements in one script, then forget the leases, also those the server had expired.

        `plain` are acks that free no key of an ordered subscription, so their entry ids are enough.
        """
        if not plain and not others:
            return
        dead_subscriptions = [sub.name for sub in self._by_topic.get(config.dead_letter or "", [])]
        args: list[Any] = [config.dead_letter or "", len(dead_subscriptions), *dead_subscriptions]
        args.append(" ".join(f"{tag.stream}:{tag.entry_id}" for tag in plain))
        for settlement in others:
            tag: _Tag = settlement.delivery.tag
            envelope = settlement.delivery.envelope
            args += [settlement.action, tag.stream, tag.entry_id, envelope.id, int(envelope.key is not None),
                     envelope.key or "", _milliseconds(settlement.delay), len(settlement.fields), *settlement.fields]
        results = await self._subscription_script("settle", config, args)

        for settlement, held in zip(others, results):
            if held:
                self._log_settlement(config, settlement)
            if held and settlement.action == "retry" and settlement.delay > 0:
                self._schedule_promotion(config.name, _milliseconds(settlement.delay))
        self._forget_all(config.name, [*plain, *[settlement.delivery.tag for settlement in others]])
        self._room.set()
        self._request_trim(config)

    def _log_settlement(self, config: SubscriptionConfig, settlement: _Settlement) -> None:
        delivery = settlement.delivery
        reason = (settlement.error or NO_ERROR).message
        if settlement.action == "dead":
            logger.error("dead-lettered message %s of subscription '%s' to '%s' at delivery %d: %s",
                         delivery.envelope.id, config.name, config.dead_letter, delivery.delivery_count, reason)
        elif settlement.action == "drop":
            logger.warning("dropped message %s of subscription '%s' at delivery %d: %s",
                           delivery.envelope.id, config.name, delivery.delivery_count, reason)

    def _forget(self, subscription: str, tag: _Tag) -> None:
        """Drop the local record of a delivery and free its place under a push consumer's cap."""
        self._leases[subscription].pop(tag, None)
        self._unsettled[subscription].pop(tag, None)
        self._released(subscription, tag)

    def _forget_all(self, subscription: str, tags: list[_Tag]) -> None:
        """Drop the local records of deliveries and free their places under push consumers' caps."""
        leases = self._leases[subscription]
        unsettled = self._unsettled[subscription]
        for tag in tags:
            leases.pop(tag, None)
            unsettled.pop(tag, None)
        self._released_all(subscription, tags)

    # Expiry and delayed retries

    async def _expire(self, config: SubscriptionConfig, claimed: list[Any]) -> None:
        """Treat claimed deliveries, idle for a whole ack timeout, as failed deliveries."""
        if not claimed:
            return
        error = ErrorInfo.timeout(config.ack_timeout)
        # NOTE: for a first delivery held by another process, which left no record of when it
        # began, first_delivered_at is estimated as one ack timeout ago.
        started = self.clock.wall() - config.ack_timeout
        leases = self._leases[config.name]
        settlements = []
        for row in claimed:
            tag = _Tag(config.name, row[0].decode(), row[1].decode())
            lease = leases.get(tag)
            delivery = lease.delivery if lease else self._delivery(config, row, started)
            if config.ack is AckPolicy.NONE:
                settlements.append(_Settlement("drop", delivery, error=error))
                continue
            settlement = self._failure(config, delivery, None, error, False, True)
            if settlement.action == "retry":
                logger.warning(
                    "message %s of subscription '%s' was not acked within %gs (delivery %d); delivering it again",
                    delivery.envelope.id, config.name, config.ack_timeout, delivery.delivery_count,
                )
            settlements.append(settlement)
        await self._settle(config, [], settlements)

    def _log_lost(self, config: SubscriptionConfig, lost: int) -> None:
        if lost:
            logger.error(
                "dropped %d deliveries of subscription '%s' that expired after their stream entries were trimmed; "
                "raise the broker option max_length", lost, config.name,
            )

    def _schedule_promotion(self, subscription: str, milliseconds: float) -> None:
        """Run the subscription's maintenance when its next delayed retry is due."""
        if milliseconds < 0:
            return
        due = self.clock.monotonic() + milliseconds / 1000 + LEASE_MARGIN_SECONDS
        scheduled = self._promotions.get(subscription)
        if scheduled is not None and self.clock.monotonic() < scheduled <= due:
            return
        self._promotions[subscription] = due
        self._push_timer(due, subscription, None)

    def _push_timer(self, due: float, subscription: str, tags: tuple[_Tag, ...] | None) -> None:
        """Run maintenance at `due` for leases `tags`, or for the next delayed retry when None."""
        earliest = self._timers[0][0] if self._timers else None
        heapq.heappush(self._timers, (due, next(self._sequence), subscription, tags))
        if earliest is None or due < earliest:
            self._timer_changed.set()

        live = sum(len(leases) for leases in self._leases.values()) + len(self._promotions)
        if len(self._timers) > 2 * live + TIMER_SLACK:
            self._compact_timers()

    def _compact_timers(self) -> None:
        """Drop timers of settled or re-armed leases, which otherwise stay until their deadline."""
        def current(timer: tuple[float, int, str, tuple[_Tag, ...] | None]) -> bool:
            due, _, subscription, tags = timer
            if tags is None:
                return True
            # A timer still counts while one of its leases has not been re-armed to a later deadline.
            leases = self._leases[subscription]
            return any((lease := leases.get(tag)) is not None and lease.deadline <= due for tag in tags)

        self._timers = [timer for timer in self._timers if current(timer)]
        heapq.heapify(self._timers)

    async def _run_timers(self) -> None:
        while True:
            for subscription, tags in self._take_due_timers().items():
                try:
                    await self._maintain(subscription, tags)
                except BrokerError as error:
                    self._errors.warning("maintenance", "expiring deliveries of '%s' failed, retrying in %gs: %s",
                                         subscription, RETRY_AFTER_ERROR_SECONDS, error)
                    retry_at = self.clock.monotonic() + RETRY_AFTER_ERROR_SECONDS
                    self._push_timer(retry_at, subscription, tuple(tags) or None)

            if self._trim_at is not None and self._trim_at <= self.clock.monotonic():
                await self._trim()

            due = [self._timers[0][0]] if self._timers else []
            if self._trim_at is not None:
                due.append(self._trim_at)
            timeout = min(due) - self.clock.monotonic() if due else None
            self._timer_changed.clear()
            await self.clock.wait(self._timer_changed, timeout)

    def _take_due_timers(self) -> dict[str, list[_Tag]]:
        """Pop due timers: per subscription, the leases of this process that should have expired."""
        now = self.clock.monotonic()
        due: dict[str, dict[_Tag, None]] = {}
        while self._timers and self._timers[0][0] <= now:
            _, _, subscription, tags = heapq.heappop(self._timers)
            if tags is None:
                self._promotions.pop(subscription, None)
                due.setdefault(subscription, {})
                continue
            # A lease re-armed by _maintain leaves its earlier timer behind; skip that one.
            # Settled leases are gone from the dict.
            leases = self._leases[subscription]
            expired = [tag for tag in tags if (lease := leases.get(tag)) is not None and lease.deadline <= now]
            if expired:
                due.setdefault(subscription, {}).update(dict.fromkeys(expired))
        return {subscription: list(tags) for subscription, tags in due.items()}

    async def _maintain(self, subscription: str, tags: list[_Tag]) -> None:
        """Expire idle deliveries and promote due retries, then re-arm leases that have time left."""
        config = self._config(subscription)
        args = [0, _milliseconds(config.ack_timeout), *[part for tag in tags for part in (tag.stream, tag.entry_id)]]
        claimed, lost, _, next_due, statuses = await self._subscription_script("fetch", config, args)
        await self._expire(config, claimed)
        self._log_lost(config, lost)

        claimed_tags = {_Tag(subscription, row[0].decode(), row[1].decode()) for row in claimed}
        for tag, remaining in zip(tags, statuses):
            if tag in claimed_tags or tag not in self._leases[subscription]:
                continue
            if remaining < 0:
                # Another process expired it, or its ack got through, so it is no longer ours.
                self._forget(subscription, tag)
            else:
                deadline = self.clock.monotonic() + remaining / 1000 + LEASE_MARGIN_SECONDS
                self._leases[subscription][tag].deadline = deadline
                self._push_timer(deadline, subscription, (tag,))
        self._schedule_promotion(subscription, next_due)

    def _request_trim(self, config: SubscriptionConfig) -> None:
        """Ask the timer task to trim the subscription's streams within TRIM_INTERVAL_SECONDS."""
        self._untrimmed.update((self._names.topic(config.topic), self._names.retry(config.name)))
        if self._trim_at is None:
            self._trim_at = max(self.clock.monotonic(), self._trimmed_at + TRIM_INTERVAL_SECONDS)
            self._timer_changed.set()

    async def _trim(self) -> None:
        """Remove entries that every group of the stream has read and settled."""
        streams, self._untrimmed = self._untrimmed, set()
        self._trim_at = None
        self._trimmed_at = self.clock.monotonic()
        for stream in sorted(streams):
            try:
                await self._run(f"trim {stream}", self._scripts["trim"](keys=[stream]))
            except BrokerError as error:
                self._errors.warning("trim", "trimming %s failed, retrying in %gs: %s", stream,
                                     TRIM_INTERVAL_SECONDS, error)
                self._untrimmed.add(stream)
        if self._untrimmed:
            self._trim_at = self._trimmed_at + TRIM_INTERVAL_SECONDS

    # Inspection

    async def stats(self) -> dict[str, Any]:
        """Return the counters and gauges of every subscription, read in one consistent snapshot."""
        topology = self._topology()
        configs = list(topology.subscriptions)
        args: list[str] = []
        for config in configs:
            args += [config.name, self._names.topic(config.topic), self._names.retry(config.name),
                     self._names.delayed(config.name)]
        reply = await self._run("read stats", self._scripts["stats"](keys=[self._names.counters], args=args))
        values = {name.decode(): int(value) for name, value in _pairs(reply[0]).items()}

        counters = Counters()
        for topic in self._by_topic:
            counters.published[topic] = values.get(f"topic:{topic}:published", 0)
        gauges = {}
        for config, (in_flight, delayed, *oldest) in zip(configs, reply[1:]):
            counts = {name: values.get(f"subscription:{config.name}:{name}", 0)
                      for name in ("delivered", "acked", "redelivered", "dead_lettered", "dropped")}
            counters.subscriptions[config.name] = SubscriptionCounters(**counts)
            size = values.get(f"subscription:{config.name}:size", 0)
            gauges[config.name] = self._gauges(size, int(in_flight), int(delayed), oldest)
        return counters.snapshot(self._by_topic, {config.name: config.topic for config in configs}, gauges)

    def _gauges(self, size: int, in_flight: int, delayed: int, oldest: list[bytes]) -> Gauges:
        """Build the backlog gauges; the oldest pending age covers unread entries only, not retries."""
        pending = max(size - in_flight, 0)
        published = [float(value) for value in oldest if value]
        age = None
        if pending and published:
            age = max(self.clock.wall() - min(published), 0.0)
        return Gauges(in_flight, pending, delayed, age)

    async def set_producer_state(self, name: str, finished: bool) -> None:
        """Record whether a producer finished, visible to every process of the flow."""
        await self._run("store a producer state",
                        self._connected().hset(self._names.producers, name, "1" if finished else "0"))

    async def producers_finished(self, names: Sequence[str]) -> bool:
        """Return whether every named producer recorded, in any process, that it finished."""
        if not names:
            return True
        states = await self._run("read producer states", self._connected().hmget(self._names.producers, list(names)))
        return all(state == b"1" for state in states)

    async def dead_letters(self, subscription: str | None = None) -> list[dict[str, Any]]:
        """List the archived dead letters, oldest first, optionally of one subscription."""
        return [letter for _, letter in await self._archived(subscription)]

    async def _archived(self, subscription: str | None) -> list[tuple[str, dict[str, Any]]]:
        """Archived dead letters with their entry ids in the archive stream."""
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                       await self._run("read dead letters", self._connected().xrange(self._names.dead_letters)))
        letters = []
        for entry_id, fields in entries:
            letter = _dead_letter(fields)
            if not subscription or letter["subscription"] == subscription:
                letters.append((entry_id.decode(), letter))
        return letters

    async def replay_dead_letters(self, subscription: str | None = None) -> int:
        """Put dead letters back on their subscription as new first deliveries and return how many."""
        replayed = 0
        for entry_id, letter in await self._archived(subscription):
            config = self._configs.get(letter["subscription"])
            if config is None:
                raise BrokerError(f"dead letter {letter['number']} belongs to subscription '{letter['subscription']}', "
                                  "which the flow no longer declares")
            headers = replay_headers(letter)
            envelope = Envelope(uuid.uuid4().hex, letter["topic"], letter["body"], letter["key"], headers,
                                self.clock.wall())
            fields = [*_entry_fields(envelope), "topic", envelope.topic, "deliveries", "0", "first_delivered_at", "0"]
            keys = [self._names.dead_letters, self._names.retry(config.name), self._names.counters]
            replayed += await self._run("replay a dead letter", self._scripts["replay"](
                keys=keys, args=[entry_id, config.name, *fields]))
        return replayed

    async def purge_dead_letters(self, subscription: str | None = None) -> int:
        """Delete archived dead letters, optionally of one subscription, and return how many."""
        client = self._connected()
        if not subscription:
            async with client.pipeline(transaction=True) as pipeline:
                pipeline.xlen(self._names.dead_letters)
                pipeline.delete(self._names.dead_letters)
                count, _ = await self._run("purge dead letters", pipeline.execute())
            return int(count)
        ids = [entry_id for entry_id, _ in await self._archived(subscription)]
        if not ids:
            return 0
        return int(await self._run("purge dead letters", client.xdel(self._names.dead_letters, *ids)))

    # Plumbing

    async def _subscription_script(self, name: str, config: SubscriptionConfig, args: Sequence[Any]) -> Any:
        keys, header = self._script_head(config)
        self._check_open()
        return await self._run(f"{name} on subscription '{config.name}'",
                               self._scripts[name](keys=keys, args=[*header, *args]))

    def _script_head(self, config: SubscriptionConfig) -> tuple[list[bytes], list[bytes]]:
        """Return the keys and leading arguments of the subscription's scripts, encoded once.

        The client passes bytes through as they are, but converts any other argument on every call.
        """
        head = self._script_heads.get(config.name)
        if head is None:
            names = self._names
            keys = [names.counters, names.topic(config.topic), names.retry(config.name), names.delayed(config.name),
                    names.owners(config.name), names.topic(config.dead_letter or config.topic), names.dead_letters]
            header = [config.name, self.consumer, names.prefix, config.topic, str(int(config.ordered)),
                      str(int(config.ack is AckPolicy.NONE))]
            head = ([key.encode() for key in keys], [value.encode() for value in header])
            self._script_heads[config.name] = head
        return head

    async def _run(self, action: str, operation: Awaitable[T]) -> T:
        """Await a client call, translating client errors into BrokerError."""
        try:
            return await operation
        except RedisError as error:
            raise self._error(action, error) from None

    def _error(self, action: str, error: RedisError) -> BrokerError:
        """Build the BrokerError for a failed client call, with the URL and any password redacted."""
        # The hint follows after a semicolon, so the client's closing period goes.
        detail = str(error).rstrip(".")
        if self._password:
            detail = detail.replace(self._password, "***")
        if isinstance(error, AuthenticationError) or "WRONGPASS" in detail or "NOAUTH" in detail:
            hint = "check the user name and password in the broker URL"
        elif isinstance(error, RedisConnectionError | RedisTimeoutError):
            hint = "check that the Redis server is running and reachable"
        elif detail.startswith("NOGROUP"):
            hint = "the flow's streams were deleted on the server; restart the flow to declare them again"
        else:
            hint = "the server rejected the command"
        return BrokerError(f"Redis {action} failed on {redact_url(self.url)}: {detail}; {hint}")

    def _connected(self) -> aioredis.Redis:
        if self._client is None:
            raise BrokerError(f"the Redis broker for {redact_url(self.url)} is not connected; call start() first")
        return self._client

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerError(f"the Redis broker for {redact_url(self.url)} is closed")

    def _config(self, subscription: str) -> SubscriptionConfig:
        try:
            return self._configs[subscription]
        except KeyError:
            raise BrokerError(f"subscription '{subscription}' is not declared on the broker") from None

    def _topology(self) -> Topology:
        if self.topology is None:
            raise BrokerError("the Redis broker has no topology; open it with start() or open_for_inspection()")
        return self.topology



def _keepalive_options() -> dict[int, int]:
    """TCP keepalive that declares a silent server dead after about a minute (Linux names)."""
    wanted = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def _milliseconds(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def _headers_of(text: bytes) -> dict[str, str]:
    return orjson.loads(text) if text != b"{}" else {}


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """Turn a flat Redis reply [name, value, name, value, ...] into a dict."""
    return dict(zip(flat[::2], flat[1::2]))


def _pack_envelope(envelope: Envelope) -> bytes:
    """Pack an envelope for the publish script: a head of flags and lengths, then the values."""
    message_id = envelope.id.encode()
    body = envelope.body
    if not isinstance(body, bytes):
        # redis-py encodes str and other bytes-like arguments, so such bodies stay accepted.
        body = body.encode() if isinstance(body, str) else bytes(body)
    key = b"" if envelope.key is None else envelope.key.encode()
    headers = json.dumps(envelope.headers).encode() if envelope.headers else b"{}"
    published_at = repr(envelope.published_at).encode()
    flags = (envelope.key is not None) | (envelope.dedupe << 1)
    head = _ENVELOPE_HEAD.pack(flags, len(message_id), len(body), len(key), len(headers), len(published_at))
    return b"".join((head, message_id, body, key, headers, published_at))


def _entry_fields(envelope: Envelope) -> list[str | bytes]:
    """Stream entry fields of a published message."""
    fields: list[str | bytes] = ["id", envelope.id, "body", envelope.body, "headers", json.dumps(envelope.headers),
                                 "published_at", repr(envelope.published_at)]
    if envelope.key is not None:
        fields += ["key", envelope.key]
    return fields


def _record_fields(delivery: Delivery) -> list[str | bytes]:
    """Fields of a redelivery: the message plus its deliveries so far and first delivery time."""
    return [*_entry_fields(delivery.envelope), "topic", delivery.envelope.topic,
            "deliveries", str(delivery.delivery_count), "first_delivered_at", repr(delivery.first_delivered_at)]


def _dead_letter(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """An archived dead letter in the shape `flowrun dlq` prints (as the sqlite backend returns it)."""
    key = fields.get(b"key")
    return {
        "number": int(fields[b"number"]),
        "subscription": fields[b"subscription"].decode(),
        "topic": fields[b"topic"].decode(),
        "message_id": fields[b"message_id"].decode(),
        "body": fields[b"body"],
        "key": None if key is None else key.decode(),
        "headers": json.loads(fields[b"headers"]),
        "dead_lettered_at": float(fields[b"dead_lettered_at"]),
    }


def _settings(config: SubscriptionConfig) -> dict[str, Any]:
    """Return the settings of a subscription that the server stores to detect changes between runs."""
    return {
        "topic": config.topic,
        "ack": config.ack.value,
        "ack_timeout": config.ack_timeout,
        "max_deliveries": config.max_deliveries,
        "dead_letter": config.dead_letter,
        "retry": config.retry.model_dump(),
        "max_pending": config.max_pending,
        "on_full": config.on_full.value,
        "ordered": config.ordered,
    }


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """List settings that differ as 'name: old -> new', nested settings as 'retry.initial'."""
    changes = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += _differences(before, after, f"{prefix}{name}.")
        elif before != after:
            changes.append(f"{prefix}{name}: {before} -> {after}")
    return changes
