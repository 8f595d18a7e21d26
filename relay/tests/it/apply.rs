//! The sink's apply path (relay/src/sink/batch.rs, relay/src/sink/ods.rs) against a real ODS
//! PostgreSQL, with records built here instead of consumed from a broker: the cases that a
//! source cannot produce on purpose.

use rdkafka::message::{OwnedMessage, Timestamp};
use saiki_relay::{plan_batch, Applier, Done};
use saiki_relay::{Ods, PartitionOffsets};
use saiki_tests::PgCluster;

const TOPIC: &str = "saiki.public.t";

fn insert(src: &str, lsn: u64, id: i64, v: &str) -> Vec<u8> {
    format!(
        r#"{{"action":"I","xid":1,"lsn":"0/{lsn:X}","commit_lsn":"0/{lsn:X}","seq":1,"schema":"public","table":"t","key":["id"],"columns":{{"id":{id},"v":"{v}"}},"types":{{"id":"integer","v":"text"}},"source":"{src}"}}"#
    )
    .into_bytes()
}

/// One batch of one partition, from offset `first`.
fn messages(first: i64, payloads: Vec<Vec<u8>>) -> Vec<OwnedMessage> {
    payloads
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            OwnedMessage::new(
                Some(p),
                None,
                TOPIC.into(),
                Timestamp::NotAvailable,
                0,
                first + i as i64,
                None,
            )
        })
        .collect()
}

fn offsets(stored: Option<i64>, next: i64) -> Vec<PartitionOffsets> {
    vec![PartitionOffsets {
        topic: TOPIC.into(),
        partition: 0,
        stored,
        next,
    }]
}

/// The ODS connection as the sink has it (no dead letters arise in these tests).
async fn applier(dsn: &str, key_includes_source: bool) -> Applier {
    Applier {
        ods: Ods::connect(dsn, "ods", "g", key_includes_source)
            .await
            .unwrap(),
        dead_letters: None,
        dead_letter_topic: "saiki.dead-letter".into(),
    }
}

fn rows(c: &mut saiki_tests::postgres::Client) -> Vec<(i32, String, String)> {
    c.query("SELECT id, v, _saiki_source FROM ods.t ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[test]
fn a_plain_insert_that_meets_an_existing_key_applies_the_batch_again_as_upserts() {
    let pg = PgCluster::start(&[]);
    let mut check = pg.create_db("ods");
    let dsn = pg.dsn("ods");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Keys without the source: shards whose keys collide meet in one ODS row.
        let mut applier = applier(&dsn, false).await;
        // Batch 1: rows new to the ODS, as plain inserts.
        let b1 = plan_batch(
            messages(
                0,
                vec![insert("a", 0x10, 1, "a1"), insert("a", 0x10, 2, "a2")],
            ),
            false,
        );
        applier.apply(&b1, &offsets(None, 2)).await.unwrap();
        assert!(!applier.ods.takes_upserts_only("t"));
        // Batch 2, on the apply task as the sink runs it: shard b inserts key 1, which shard
        // a's row holds. The plain insert fails; the batch is applied again as upserts.
        let b2 = plan_batch(
            messages(
                2,
                vec![insert("b", 0x10, 1, "b1"), insert("b", 0x10, 3, "b3")],
            ),
            false,
        );
        let done: Done = applier.spawn(b2, offsets(Some(2), 4)).await.unwrap();
        let applied = done.result.expect("batch 2 applies after the retry");
        assert_eq!(applied.written, 2);
        let mut applier = done.applier;
        assert!(
            applier.ods.takes_upserts_only("t"),
            "the plain insert met key 1"
        );
        // Batch 3: the table takes upserts only now, and still applies new keys.
        let b3 = plan_batch(
            messages(
                4,
                vec![insert("a", 0x20, 4, "a4"), insert("b", 0x20, 2, "b2")],
            ),
            false,
        );
        applier.apply(&b3, &offsets(Some(4), 6)).await.unwrap();
    });
    assert_eq!(
        rows(&mut check),
        vec![
            (1, "b1".to_string(), "b".to_string()),
            (2, "b2".to_string(), "b".to_string()),
            (3, "b3".to_string(), "b".to_string()),
            (4, "a4".to_string(), "a".to_string()),
        ]
    );
    let next: i64 = check
        .query_one(
            "SELECT next_offset FROM saiki_sink.offsets WHERE topic = $1",
            &[&TOPIC],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        next, 6,
        "each batch's offsets committed once, with its rows"
    );
}

/// The fence on the apply task: a batch whose partition another instance moved on does not
/// commit, and neither does a later one that starts from offsets the ODS does not hold.
#[test]
fn batches_on_the_apply_task_are_fenced_when_another_instance_moved_their_offsets() {
    let pg = PgCluster::start(&[]);
    let mut check = pg.create_db("ods");
    let dsn = pg.dsn("ods");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut applier = rt.block_on(async {
        let mut applier = applier(&dsn, true).await;
        let b1 = plan_batch(messages(0, vec![insert("a", 0x10, 1, "a1")]), true);
        applier.apply(&b1, &offsets(None, 1)).await.unwrap();
        applier
    });
    // Another instance moves the partition on meanwhile (a rebalance).
    check
        .execute("UPDATE saiki_sink.offsets SET next_offset = 5", &[])
        .unwrap();
    rt.block_on(async {
        // A batch from offset 1 (on the apply task), and one from offset 2:
        let b2 = plan_batch(messages(1, vec![insert("a", 0x20, 2, "a2")]), true);
        let done = applier.spawn(b2, offsets(Some(1), 2)).await.unwrap();
        assert!(matches!(done.result, Err(saiki_relay::ApplyError::Fenced)));
        applier = done.applier;
        let b3 = plan_batch(messages(2, vec![insert("a", 0x30, 3, "a3")]), true);
        let r = applier.apply(&b3, &offsets(Some(2), 3)).await;
        assert!(matches!(r, Err(saiki_relay::ApplyError::Fenced)));
    });
    assert_eq!(
        rows(&mut check),
        vec![(1, "a1".to_string(), "a".to_string())]
    );
}
