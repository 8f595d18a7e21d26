//! Shared by the relay's integration tests: running the relay binary and reading topics.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use saiki_tests::{Broker, PgCluster};

pub const BIN: &str = env!("CARGO_BIN_EXE_saiki-relay");

pub struct Msg {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

impl Msg {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.payload.as_deref().expect("a value")).expect("JSON value")
    }
}

/// A relay process with its config file and log.
pub struct Relay {
    pub child: Child,
    pub http_port: u16,
    pub log: PathBuf,
    pub config: PathBuf,
}

pub fn relay_config(
    pg: &PgCluster,
    db: &str,
    broker: &Broker,
    http_port: u16,
    extra_source: &str,
) -> String {
    format!(
        r#"[source]
name = "shard1"
dsn = "host=127.0.0.1 port={} user=postgres dbname={db}"
slot = "saiki_test"
heartbeat_interval = "1s"
status_interval = "200ms"
reconnect_backoff_max = "1s"
shutdown_grace = "20s"
{extra_source}

[kafka]
brokers = "{}"
topic_prefix = "saiki"

[http]
listen = "127.0.0.1:{http_port}"
"#,
        pg.port,
        broker.addr()
    )
}

/// A sink config for the ODS database `db` of `ods`, reading `broker`.
pub fn sink_config(
    ods: &PgCluster,
    db: &str,
    broker: &Broker,
    http_port: u16,
    extra_sink: &str,
) -> String {
    format!(
        r#"[sink]
dsn = "host=127.0.0.1 port={} user=postgres dbname={db}"
instance_id = "test-sink"
batch_linger = "20ms"
rejoin_timeout = "30s"
reconnect_backoff_max = "1s"
topic_refresh = "500ms"
{extra_sink}

[kafka]
brokers = "{}"
topic_prefix = "saiki"

[http]
listen = "127.0.0.1:{http_port}"
"#,
        ods.port,
        broker.addr()
    )
}

impl Relay {
    pub fn start(dir: &std::path::Path, config: &str, http_port: u16) -> Relay {
        Relay::start_command(dir, config, http_port, "source")
    }

    pub fn start_sink(dir: &std::path::Path, config: &str, http_port: u16) -> Relay {
        Relay::start_command(dir, config, http_port, "sink")
    }

    pub fn start_lake(dir: &std::path::Path, config: &str, http_port: u16) -> Relay {
        Relay::start_command(dir, config, http_port, "lake")
    }

    pub fn start_ingest(dir: &std::path::Path, config: &str, http_port: u16) -> Relay {
        Relay::start_command(dir, config, http_port, "ingest")
    }

    fn start_command(dir: &std::path::Path, config: &str, http_port: u16, command: &str) -> Relay {
        let cfg = dir.join(format!("relay-{http_port}.toml"));
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join(format!("relay-{http_port}.log"));
        let child = Command::new(BIN)
            .args(["--config", cfg.to_str().unwrap(), command])
            .env("RUST_LOG", "saiki_relay=debug,info")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .expect("start saiki-relay");
        Relay {
            child,
            http_port,
            log,
            config: cfg,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn http_get(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status of a relay that stops on its own within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "relay still runs after {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and the exit status within `within`.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(within)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the slot's confirmed_flush_lsn reaches `lsn` (text), or panics with the log.
pub fn wait_confirmed(
    db: &mut saiki_tests::postgres::Client,
    slot: &str,
    lsn: &str,
    within: Duration,
    relay: &Relay,
) {
    let deadline = Instant::now() + within;
    loop {
        let done: Option<bool> = db
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &lsn],
            )
            .ok()
            .and_then(|r| r.get(0));
        if done == Some(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} not confirmed to {lsn} within {within:?}; relay log:\n{}",
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads every message of `topics` from the beginning until `count` messages arrived or
/// nothing new came for `quiet`.
pub fn consume(brokers: &str, topics: &[&str], count: usize, quiet: Duration) -> Vec<Msg> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("saiki-test-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .expect("metadata");
        for mt in md.topics() {
            for p in mt.partitions() {
                tpl.add_partition_offset(t, p.id(), Offset::Beginning)
                    .unwrap();
            }
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut last = Instant::now();
    while out.len() < count && last.elapsed() < quiet {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    String::from_utf8_lossy(x.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Msg {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| k.to_vec()),
                    payload: m.payload().map(|p| p.to_vec()),
                    headers,
                });
                last = Instant::now();
            }
            Some(Err(e)) => panic!("consume: {e}"),
            None => {}
        }
    }
    out
}

/// Waits until the relay holds its slot (`saiki_test`) active.
pub fn wait_slot_active(db: &mut saiki_tests::postgres::Client, relay: &Relay) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while db
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'saiki_test' AND active",
            &[],
        )
        .unwrap()
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "relay never streamed:\n{}",
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Rows of a query as text (simple protocol: PostgreSQL's output functions), sorted.
pub fn text_rows(db: &mut saiki_tests::postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let mut rows: Vec<Vec<Option<String>>> = db
        .simple_query(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            saiki_tests::postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect();
    rows.sort();
    rows
}

/// Rows of a query as text (simple protocol), in the query's order; `None` on an error (a
/// table not created yet).
pub fn ordered_rows(
    db: &mut saiki_tests::postgres::Client,
    sql: &str,
) -> Option<Vec<Vec<Option<String>>>> {
    let msgs = db.simple_query(sql).ok()?;
    Some(
        msgs.into_iter()
            .filter_map(|m| match m {
                saiki_tests::postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect(),
    )
}

/// Waits until `dst_sql` on the ODS gives, in order, what `src_sql` gives at the source.
pub fn wait_same_rows(
    src: &mut saiki_tests::postgres::Client,
    ods: &mut saiki_tests::postgres::Client,
    src_sql: &str,
    dst_sql: &str,
    relay: &Relay,
    within: Duration,
) {
    let want = ordered_rows(src, src_sql).expect(src_sql);
    wait_until(within, relay, || {
        let got = ordered_rows(ods, dst_sql).unwrap_or_default();
        (got != want).then(|| {
            let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).take(3).collect();
            format!(
                "{dst_sql}: {} rows, want {}; missing {missing:?}",
                got.len(),
                want.len()
            )
        })
    });
}

/// Rows of a query as text, in the query's order; `Err` (say, a table not created yet) as text.
pub fn try_rows(
    db: &mut saiki_tests::postgres::Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, String> {
    db.query(sql, &[]).map_err(|e| e.to_string()).map(|rows| {
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.get::<_, Option<String>>(i))
                    .collect()
            })
            .collect()
    })
}

/// Waits until `sql` (columns cast to text) gives `want`, with the relay's log on failure.
pub fn wait_rows(
    db: &mut saiki_tests::postgres::Client,
    relay: &Relay,
    sql: &str,
    want: Vec<Vec<Option<String>>>,
) {
    wait_until(Duration::from_secs(90), relay, || {
        let got = try_rows(db, sql);
        (got.as_ref() != Ok(&want)).then(|| format!("{sql}: {got:?}, want {want:?}"))
    });
}

/// Polls `check` until it returns None (done) or `within` passes; then panics with the last
/// reason and the relay's log.
pub fn wait_until(within: Duration, relay: &Relay, mut check: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + within;
    loop {
        let Some(why) = check() else { return };
        if Instant::now() > deadline {
            let log = relay.log_text();
            let tail: String = log
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!("not within {within:?}: {why}\n--- log tail ---\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Produces raw messages (key, value) into `topic` with a current librdkafka.
/// A raw Kafka message: key and value, either absent.
pub type RawMsg<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

pub fn produce_raw(brokers: &str, topic: &str, msgs: &[RawMsg<'_>]) {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer");
    for (k, v) in msgs {
        let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(k) = k {
            r = r.key(k);
        }
        if let Some(v) = v {
            r = r.payload(v);
        }
        p.send(r).map_err(|(e, _)| e).expect("produce");
    }
    p.flush(Duration::from_secs(30)).expect("flush");
}

/// One metric's value from a /metrics text (first sample with that name).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Creates a topic (the tests that produce by hand need it before the sink subscribes).
pub fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let res = rt
        .block_on(admin.create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        ))
        .expect("create topic");
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// An audit of every ODS row write: a trigger on each table the sink creates in schema `ods`
/// (added by an event trigger in the creating transaction) records (table, source, commit_lsn,
/// seq) of each insert and update.
pub const ODS_AUDIT: &str = "
CREATE TABLE public.audit (tbl text, source text, lsn pg_lsn, seq int, op text);
CREATE FUNCTION public.audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.audit VALUES (TG_TABLE_NAME, NEW._saiki_source, NEW._saiki_commit_lsn, NEW._saiki_seq, TG_OP);
  RETURN NULL;
END $$;
CREATE FUNCTION public.add_audit() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands()
           WHERE command_tag = 'CREATE TABLE' AND schema_name = 'ods' LOOP
    EXECUTE format('CREATE TRIGGER audit AFTER INSERT OR UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION public.audit_row()', r.object_identity);
  END LOOP;
END $$;
CREATE EVENT TRIGGER add_audit ON ddl_command_end WHEN TAG IN ('CREATE TABLE') EXECUTE FUNCTION public.add_audit();
";

/// No `(table, source, commit_lsn, seq)` wrote an ODS row twice, and the audit saw writes.
pub fn assert_no_change_applied_twice(ods: &mut saiki_tests::postgres::Client) {
    let twice = text_rows(
        ods,
        "SELECT tbl, source, lsn::text, seq::text, count(*)::text FROM public.audit GROUP BY 1, 2, 3, 4 HAVING count(*) > 1 LIMIT 5",
    );
    assert!(twice.is_empty(), "changes applied twice: {twice:?}");
    let audited = text_rows(ods, "SELECT count(*) FROM public.audit");
    assert_ne!(
        audited[0][0].as_deref(),
        Some("0"),
        "the audit saw the writes"
    );
}
