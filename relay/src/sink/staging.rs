//! The ODS side of streamed transactions (`sink/stream.rs` says what and why): the staging
//! tables in `saiki_sink`, written inside the batch's transaction.
//!
//! - `staged`: one row per streamed record (source, xid, attempt, seq), with the Kafka
//!   message's origin, key and payload.
//! - `streams`: one row per open transaction sending (source, xid, attempt): rows staged, when
//!   the first came. Its rows are what `saiki-relay status` and the metrics show.
//! - `stream_aborts`: the subtransactions rolled back.
//! - `stream_ends`: the end copies read so far. A partition with a commit's copy here waits
//!   (`holding`).

use rdkafka::message::OwnedMessage;
use rdkafka::Timestamp;
use tokio_postgres::Client;

use crate::sink::offsets::Tp;
use crate::sink::plan::Msg;
use crate::sink::stream::{End, StreamKey, StreamOps};

/// Tables of the staging, created with the other bookkeeping (`Ods::bootstrap`).
pub(crate) const TABLES: &str = "
    CREATE TABLE IF NOT EXISTS saiki_sink.staged (
        source text NOT NULL,
        xid bigint NOT NULL,
        attempt bigint NOT NULL,
        seq bigint NOT NULL,
        subxid bigint NOT NULL,
        topic text NOT NULL,
        \"partition\" int NOT NULL,
        kafka_offset bigint NOT NULL,
        key bytea,
        payload text NOT NULL,
        PRIMARY KEY (source, xid, attempt, seq));
    COMMENT ON TABLE saiki_sink.staged IS 'saiki-relay sink: records of streamed transactions that have not ended, applied at their commit, dropped at their abort';
    CREATE TABLE IF NOT EXISTS saiki_sink.streams (
        source text NOT NULL,
        xid bigint NOT NULL,
        attempt bigint NOT NULL,
        staged_rows bigint NOT NULL DEFAULT 0,
        first_staged_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (source, xid, attempt));
    COMMENT ON TABLE saiki_sink.streams IS 'saiki-relay sink: streamed transactions staged and not yet ended, with their staged rows';
    CREATE TABLE IF NOT EXISTS saiki_sink.stream_aborts (
        source text NOT NULL,
        xid bigint NOT NULL,
        attempt bigint NOT NULL,
        subxid bigint NOT NULL,
        PRIMARY KEY (source, xid, attempt, subxid));
    CREATE TABLE IF NOT EXISTS saiki_sink.stream_ends (
        source text NOT NULL,
        xid bigint NOT NULL,
        attempt bigint NOT NULL,
        topic text NOT NULL,
        \"partition\" int NOT NULL,
        is_commit bool NOT NULL,
        PRIMARY KEY (source, xid, attempt, topic, \"partition\"));
    COMMENT ON TABLE saiki_sink.stream_ends IS 'saiki-relay sink: end copies of streamed transactions read so far; a partition with a commit copy here waits until the transaction is applied (deleting the rows releases it)';
    CREATE INDEX IF NOT EXISTS stream_ends_partition ON saiki_sink.stream_ends (topic, \"partition\");";

/// Stages the batch's streamed records, skipping those of rolled-back subtransactions and of
/// sendings a newer attempt replaced; returns the rows staged (a replayed copy stages none).
pub(crate) async fn stage(
    client: &Client,
    ops: &StreamOps,
    msgs: &[Msg<'_>],
) -> Result<u64, tokio_postgres::Error> {
    if ops.staged.is_empty() {
        return Ok(0);
    }
    let n = ops.staged.len();
    let (mut source, mut xid, mut attempt, mut seq, mut subxid) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut topic, mut partition, mut offset, mut key, mut payload) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for s in &ops.staged {
        let m = &msgs[s.idx];
        source.push(s.key.source.as_str());
        xid.push(s.key.xid);
        attempt.push(s.key.attempt);
        seq.push(s.seq);
        subxid.push(s.subxid);
        topic.push(m.topic);
        partition.push(m.partition);
        offset.push(m.offset);
        key.push(m.key);
        // The planner took it as JSON, so it is UTF-8.
        payload.push(std::str::from_utf8(m.payload.unwrap_or_default()).unwrap_or_default());
    }
    let row = client
        .query_one(
            "WITH batch AS (
                 SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::text[], $7::int4[], $8::int8[], $9::bytea[], $10::text[])
                     AS u(source, xid, attempt, seq, subxid, topic, \"partition\", kafka_offset, key, payload)),
             ins AS (
                 INSERT INTO saiki_sink.staged (source, xid, attempt, seq, subxid, topic, \"partition\", kafka_offset, key, payload)
                 SELECT b.* FROM batch b
                 WHERE NOT EXISTS (SELECT 1 FROM saiki_sink.stream_aborts a
                                   WHERE (a.source, a.xid, a.attempt, a.subxid) = (b.source, b.xid, b.attempt, b.subxid))
                   AND NOT EXISTS (SELECT 1 FROM saiki_sink.streams s
                                   WHERE (s.source, s.xid) = (b.source, b.xid) AND s.attempt > b.attempt)
                 ON CONFLICT DO NOTHING
                 RETURNING source, xid, attempt),
             counted AS (
                 INSERT INTO saiki_sink.streams AS s (source, xid, attempt, staged_rows)
                 SELECT source, xid, attempt, count(*) FROM ins GROUP BY 1, 2, 3
                 ON CONFLICT (source, xid, attempt) DO UPDATE SET staged_rows = s.staged_rows + EXCLUDED.staged_rows
                 RETURNING staged_rows)
             SELECT (SELECT count(*) FROM ins)::int8",
            &[&source, &xid, &attempt, &seq, &subxid, &topic, &partition, &offset, &key, &payload],
        )
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Records rolled-back subtransactions and drops what they staged.
pub(crate) async fn abort_subxacts(
    client: &Client,
    ops: &StreamOps,
) -> Result<(), tokio_postgres::Error> {
    for (k, subxid) in &ops.subxact_aborts {
        client
            .execute(
                "WITH gone AS (DELETE FROM saiki_sink.staged
                               WHERE (source, xid, attempt, subxid) = ($1, $2, $3, $4) RETURNING 1)
                 INSERT INTO saiki_sink.stream_aborts (source, xid, attempt, subxid)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&k.source, &k.xid, &k.attempt, subxid],
            )
            .await?;
    }
    Ok(())
}

/// What an end copy decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// More copies to come: the transaction stays staged.
    Waiting,
    /// The last copy: the transaction is to be applied (a commit) or dropped (an abort), and
    /// the staging emptied ([`finish`]).
    Complete,
    /// A newer attempt of the transaction exists: this copy and its attempt are void.
    Superseded,
}

/// Records an end copy, under the transaction's lock (held to the batch's commit, so that
/// two instances reading its last two copies at once see each other's).
pub(crate) async fn end(client: &Client, e: &End) -> Result<Ended, tokio_postgres::Error> {
    let k = &e.key;
    client
        .execute(
            // The source's name hashed with the xid as the seed: one lock per transaction.
            "SELECT pg_advisory_xact_lock(hashtextextended($1, $2))",
            &[&k.source, &k.xid],
        )
        .await?;
    let newer: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM saiki_sink.streams WHERE (source, xid) = ($1, $2) AND attempt > $3)
                 OR EXISTS (SELECT 1 FROM saiki_sink.stream_ends WHERE (source, xid) = ($1, $2) AND attempt > $3)",
            &[&k.source, &k.xid, &k.attempt],
        )
        .await?
        .get(0);
    if newer {
        drop_attempts(client, k, "attempt = $3").await?;
        return Ok(Ended::Superseded);
    }
    // An older attempt never ends: this one sent the whole transaction again.
    drop_attempts(client, k, "attempt < $3").await?;
    let arrived: i64 = client
        .query_one(
            "WITH ins AS (
                 INSERT INTO saiki_sink.stream_ends (source, xid, attempt, topic, \"partition\", is_commit)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING 1)
             SELECT (SELECT count(*) FROM saiki_sink.stream_ends WHERE (source, xid, attempt) = ($1, $2, $3))
                  + (SELECT count(*) FROM ins)",
            &[&k.source, &k.xid, &k.attempt, &e.topic, &e.partition, &e.commit.is_some()],
        )
        .await?
        .get(0);
    Ok(if arrived >= e.copies {
        Ended::Complete
    } else {
        Ended::Waiting
    })
}

/// Deletes what the sendings of `k`'s transaction matching `which` (on `$3`, the attempt)
/// left in the staging.
async fn drop_attempts(
    client: &Client,
    k: &StreamKey,
    which: &str,
) -> Result<(), tokio_postgres::Error> {
    for table in ["staged", "streams", "stream_aborts", "stream_ends"] {
        client
            .execute(
                &format!(
                    "DELETE FROM saiki_sink.{table} WHERE (source, xid) = ($1, $2) AND {which}"
                ),
                &[&k.source, &k.xid, &k.attempt],
            )
            .await?;
    }
    Ok(())
}

/// Empties the staging of an ended transaction (after its rows were applied).
pub(crate) async fn finish(client: &Client, k: &StreamKey) -> Result<(), tokio_postgres::Error> {
    drop_attempts(client, k, "attempt <= $3").await
}

/// One chunk of a committed transaction's staged records after `after_seq`, in `seq` order,
/// without those of rolled-back subtransactions, as the Kafka messages they came from.
pub(crate) async fn chunk(
    client: &Client,
    k: &StreamKey,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, OwnedMessage)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT seq, topic, \"partition\", kafka_offset, key, payload FROM saiki_sink.staged s
             WHERE (source, xid, attempt) = ($1, $2, $3) AND seq > $4
               AND NOT EXISTS (SELECT 1 FROM saiki_sink.stream_aborts a
                               WHERE (a.source, a.xid, a.attempt, a.subxid) = (s.source, s.xid, s.attempt, s.subxid))
             ORDER BY seq LIMIT $5",
            &[&k.source, &k.xid, &k.attempt, &after_seq, &limit],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let payload: String = r.get(5);
            let m = OwnedMessage::new(
                Some(payload.into_bytes()),
                r.get::<_, Option<Vec<u8>>>(4),
                r.get(1),
                Timestamp::NotAvailable,
                r.get(2),
                r.get(3),
                None,
            );
            (r.get(0), m)
        })
        .collect())
}

/// Of `parts`, those waiting for a streamed transaction's commit: a copy of its end is
/// recorded for them and it has not been applied.
pub(crate) async fn holding(
    client: &Client,
    parts: &[Tp],
) -> Result<Vec<Tp>, tokio_postgres::Error> {
    if parts.is_empty() {
        return Ok(Vec::new());
    }
    let topics: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
    let nums: Vec<i32> = parts.iter().map(|p| p.1).collect();
    let rows = client
        .query(
            "SELECT DISTINCT e.topic, e.\"partition\" FROM saiki_sink.stream_ends e
             JOIN unnest($1::text[], $2::int4[]) AS p(topic, \"partition\") USING (topic, \"partition\")
             WHERE e.is_commit",
            &[&topics, &nums],
        )
        .await?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Open streamed transactions and their staged rows, all instances.
pub(crate) async fn gauges(client: &Client) -> Result<(u64, u64), tokio_postgres::Error> {
    let r = client
        .query_one(
            "SELECT count(*)::int8, coalesce(sum(staged_rows), 0)::int8 FROM saiki_sink.streams",
            &[],
        )
        .await?;
    Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
}
