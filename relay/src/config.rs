//! Configuration (docs/configuration.md): a TOML file, overridden by `SAIKI_<SECTION>_<KEY>`
//! environment variables, overridden by flags. Unknown keys are errors, so a typo never
//! silently falls back to a default. `saiki-relay --help-config` prints every key.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::error::RelayError;

/// Every key with its default and meaning, printed by `--help-config` and checked against the
/// structs below by a unit test.
pub(crate) const REFERENCE: &str = r#"[source]
name = "shard1"                  # required: goes into every record ("source") and header
dsn = "postgres://saiki@127.0.0.1:5432/shop"   # required: URI or key=value; replication is added
                                 # several hosts (host=a,b target_session_attrs=read-write):
                                 # the primary among them, after a failover too
slot = "saiki_shard1"            # created with plugin saiki if missing (never dropped)
tables = []                      # add-tables patterns, e.g. ["public.*"]; empty = all tables
heartbeat_interval = "10s"       # pg_logical_emit_message on a side connection; "0s" = off
status_interval = "1s"           # standby status updates (keep well under wal_sender_timeout)
snapshot = "never"               # "initial": snapshot the captured tables when the slot is created
snapshot_chunk_rows = 10000      # rows per snapshot chunk (one read between two watermarks)
max_in_flight = 100000           # messages produced but not yet acknowledged by Kafka
batch_bytes = 65536              # plugin batch-bytes: records per replication message
tombstones = false               # a null-value message after each delete (log compaction)
include_types = true             # plugin include-types: the sink creates ODS tables from them
include_timestamp = true         # plugin include-timestamp: commit_ts, the sink's freshness metric
stream_large = true              # plugin stream-changes: a transaction past logical_decoding_work_mem
                                 # reaches Kafka while it runs (records marked "streamed"; docs/relay.md)
reconnect_backoff_max = "30s"    # cap of the exponential backoff between attempts
shutdown_grace = "30s"           # SIGTERM: time to drain in-flight messages before exiting

[kafka]
brokers = "127.0.0.1:9092"       # bootstrap.servers
topic_prefix = "saiki"
topic_template = "{prefix}.{schema}.{table}"   # also {source}
partitions = 1                   # for topics the relay creates
replication_factor = 1
headers = true                   # saiki.source, saiki.lsn, saiki.commit_lsn, saiki.xid on every message
[kafka.properties]               # passed to librdkafka as they are, e.g. "compression.type" = "lz4"

[sink]
dsn = "postgres://saiki@127.0.0.1:5432/ods"    # required for `sink`: the ODS
schema = "ods"                   # ODS tables are {schema}.{table}; bookkeeping is in saiki_sink
group = "saiki-ods"              # Kafka consumer group, and the key of saiki_sink.offsets
instance_id = "sink-1"           # group.instance.id (static membership): unique per instance; a
                                 # restart takes its partitions back at once. Unset: dynamic
topics = "^saiki\\..*"            # regex over topic names; default: every {topic_prefix}.* topic
key_includes_source = true       # primary key (_saiki_source, key...): shards whose keys collide
on_drop = "drop"                 # a column or table dropped at every source leaves the ODS; "keep": it stays
events = true                    # materialize the event API's events as {schema}.ev_{type} (registry: ingest.dsn)
batch_max_rows = 10000           # messages per ODS transaction
batch_max_bytes = 33554432       # message bytes per ODS transaction
batch_linger = "10ms"            # how long a batch waits to fill after its first message
dead_letter_topic = "saiki.dead-letter"   # default {topic_prefix}.dead-letter
topic_refresh = "5s"             # how often new matching topics are picked up (0.5 s while none matches)
tombstone_retention = "24h"      # how long a deleted row's (lsn, seq) is kept against replays
rejoin_timeout = "5m"            # a consumer group still unsettled after this: rejoin with a new consumer
reconnect_backoff_max = "30s"    # cap of the exponential backoff after an ODS or Kafka failure
shutdown_grace = "30s"           # SIGTERM: time to commit the batch in hand before exiting

[ingest]
dsn = "postgres://saiki@127.0.0.1:5432/ods"    # the registry (event types, schemas, tokens); default sink.dsn
admin_token = "change-me-to-a-long-secret"     # required for `ingest`: the first admin token (SAIKI_INGEST_ADMIN_TOKEN)
listen = "127.0.0.1:8080"        # the event API (HTTP/1.1 and HTTP/2)
# tls_cert = "/etc/saiki/ingest.pem"   # PEM certificate chain; with tls_key the API speaks only HTTPS
# tls_key = "/etc/saiki/ingest.key"    # PEM private key (PKCS#8, PKCS#1 or SEC1)
max_body_bytes = 1048576         # a larger request body is refused with 413
max_batch_events = 1000          # events per request at most (413 beyond)
registry_cache = "5s"            # how long event types, schemas and tokens are cached
max_in_flight_events = 10000     # events not yet acknowledged by Kafka; a batch beyond: 429
dedup_window = "10m"             # a retried batch's events with a known metadata.eid are not produced again
dedup_capacity = 1000000         # eids remembered at most
ack_timeout = "10s"              # a batch Kafka has not acknowledged by then is answered 503
shutdown_grace = "30s"           # SIGTERM: time to finish the requests in flight

[lake]
warehouse = "file:///var/lib/saiki/lake"   # where the Parquet and metadata files go: a local folder, or s3://bucket/prefix
s3_endpoint = "http://127.0.0.1:9000"   # an S3-compatible store (MinIO, Ceph, ...); unset: AWS S3
s3_region = "us-east-1"          # the bucket's region
s3_access_key_id = "saiki"       # unset: the AWS defaults (AWS_ACCESS_KEY_ID, ~/.aws, instance role)
s3_secret_access_key = "change-me"   # SAIKI_LAKE_S3_SECRET_ACCESS_KEY keeps it out of the file
s3_path_style = true             # bucket in the path (http://host/bucket/key); unset: true with s3_endpoint, else false
catalog_dsn = "postgres://saiki@127.0.0.1:5432/ods"   # the Iceberg SQL catalog; default sink.dsn
catalog_name = "saiki"           # the catalog's name (PyIceberg: SqlCatalog("saiki", ...))
namespace = "saiki"              # tables are {namespace}.{table}_changes ({schema}_{table}_changes outside public)
group = "saiki-lake"             # Kafka consumer group (where reading starts; the tables decide what is new)
instance_id = "lake-1"           # group.instance.id (static membership). Unset: dynamic
topics = "^saiki\\..*"            # regex over topic names; default: every {topic_prefix}.* topic
target_file_size = 67108864      # a data file rolls over at this size
commit_interval = "60s"          # the longest a change waits before it is committed to its table
snapshot_retention = "168h"      # snapshots older than this expire (time travel reaches back this far)
events = true                    # keep the event API's events as {namespace}.ev_{type} (registry: ingest.dsn, else catalog_dsn)
reconnect_backoff_max = "30s"    # cap of the exponential backoff after a failure
shutdown_grace = "30s"           # SIGTERM: time to commit what is buffered before exiting

[http]
listen = "127.0.0.1:9187"        # /metrics /health /ready; "" = off

[log]
format = "text"                  # or "json"
level = "info"                   # tracing filter, e.g. "saiki_relay=debug"
"#;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    #[serde(default)]
    pub(crate) source: Option<SourceConfig>,
    #[serde(default)]
    pub(crate) kafka: KafkaConfig,
    #[serde(default)]
    pub(crate) sink: Option<SinkConfig>,
    #[serde(default)]
    pub(crate) ingest: Option<IngestConfig>,
    #[serde(default)]
    pub(crate) lake: Option<LakeConfig>,
    #[serde(default)]
    pub(crate) http: HttpConfig,
    #[serde(default)]
    pub(crate) log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SourceConfig {
    pub(crate) name: String,
    pub(crate) dsn: String,
    #[serde(default)]
    pub(crate) slot: Option<String>,
    #[serde(default)]
    pub(crate) tables: Vec<String>,
    #[serde(default = "d_10s", with = "duration")]
    pub(crate) heartbeat_interval: Duration,
    #[serde(default = "d_1s", with = "duration")]
    pub(crate) status_interval: Duration,
    #[serde(default)]
    pub(crate) snapshot: SnapshotMode,
    #[serde(default = "d_chunk_rows")]
    pub(crate) snapshot_chunk_rows: usize,
    #[serde(default = "d_in_flight")]
    pub(crate) max_in_flight: usize,
    #[serde(default = "d_batch")]
    pub(crate) batch_bytes: usize,
    #[serde(default)]
    pub(crate) tombstones: bool,
    #[serde(default = "d_true")]
    pub(crate) include_types: bool,
    #[serde(default = "d_true")]
    pub(crate) include_timestamp: bool,
    /// Open the slot with `stream-changes`: large transactions are produced while they run.
    #[serde(default = "d_true")]
    pub(crate) stream_large: bool,
    #[serde(default = "d_30s", with = "duration")]
    pub(crate) reconnect_backoff_max: Duration,
    #[serde(default = "d_30s", with = "duration")]
    pub(crate) shutdown_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KafkaConfig {
    #[serde(default = "d_brokers")]
    pub(crate) brokers: String,
    #[serde(default = "d_prefix")]
    pub(crate) topic_prefix: String,
    #[serde(default = "d_template")]
    pub(crate) topic_template: String,
    #[serde(default = "d_one")]
    pub(crate) partitions: i32,
    #[serde(default = "d_one")]
    pub(crate) replication_factor: i32,
    /// The four headers of docs/relay.md on every message (on by default; some brokers store
    /// each header separately, at a cost per message).
    #[serde(default = "d_true")]
    pub(crate) headers: bool,
    #[serde(default)]
    pub(crate) properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: d_brokers(),
            topic_prefix: d_prefix(),
            topic_template: d_template(),
            partitions: 1,
            replication_factor: 1,
            headers: true,
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SinkConfig {
    pub(crate) dsn: String,
    #[serde(default = "d_ods")]
    pub(crate) schema: String,
    #[serde(default = "d_group")]
    pub(crate) group: String,
    /// `group.instance.id`; `None` = dynamic membership.
    #[serde(default)]
    pub(crate) instance_id: Option<String>,
    /// Regex over topic names; `None` = every topic of `kafka.topic_prefix`.
    #[serde(default)]
    pub(crate) topics: Option<String>,
    #[serde(default = "d_true")]
    pub(crate) key_includes_source: bool,
    /// What the ODS does when every source has dropped a column or a table.
    #[serde(default)]
    pub(crate) on_drop: OnDrop,
    /// Materialize the event API's events into `{schema}.ev_{type}` tables (their layouts
    /// come from the registry at `ingest.dsn`); false: events are skipped.
    #[serde(default = "d_true")]
    pub(crate) events: bool,
    #[serde(default = "d_batch_rows")]
    pub(crate) batch_max_rows: usize,
    #[serde(default = "d_batch_bytes")]
    pub(crate) batch_max_bytes: usize,
    #[serde(default = "d_10ms", with = "duration")]
    pub(crate) batch_linger: Duration,
    /// `None` = `{topic_prefix}.dead-letter`.
    #[serde(default)]
    pub(crate) dead_letter_topic: Option<String>,
    #[serde(default = "d_5s", with = "duration")]
    pub(crate) topic_refresh: Duration,
    #[serde(default = "d_24h", with = "duration")]
    pub(crate) tombstone_retention: Duration,
    /// How long the consumer group may stay unsettled (a rebalance that does not complete)
    /// before the session ends and rejoins with a new consumer. The default is Kafka's
    /// default rebalance timeout (`max.poll.interval.ms`): a rebalance still open past it
    /// will not complete on its own.
    #[serde(default = "d_5m", with = "duration")]
    pub(crate) rejoin_timeout: Duration,
    #[serde(default = "d_30s", with = "duration")]
    pub(crate) reconnect_backoff_max: Duration,
    #[serde(default = "d_30s", with = "duration")]
    pub(crate) shutdown_grace: Duration,
}

/// `[ingest]`: the HTTP event API (docs/ingest.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IngestConfig {
    /// The registry database (event types, schemas, tokens); default: `sink.dsn`, the ODS.
    #[serde(default)]
    pub(crate) dsn: Option<String>,
    /// The first admin token (`SAIKI_INGEST_ADMIN_TOKEN`): at least 16 characters; required
    /// by `saiki-relay ingest`, and only there.
    #[serde(default)]
    pub(crate) admin_token: Option<String>,
    #[serde(default = "d_ingest_listen")]
    pub(crate) listen: String,
    /// PEM certificate chain and private key: both set, the API speaks HTTPS only.
    #[serde(default)]
    pub(crate) tls_cert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub(crate) tls_key: Option<std::path::PathBuf>,
    /// The largest request body; a larger one is refused with 413.
    #[serde(default = "d_body")]
    pub(crate) max_body_bytes: usize,
    /// Events of one request at most; more are refused with 413.
    #[serde(default = "d_events")]
    pub(crate) max_batch_events: usize,
    /// How long the registry's answers are cached (event types, schemas, tokens).
    #[serde(default = "d_5s", with = "duration")]
    pub(crate) registry_cache: Duration,
    /// Events handed to Kafka and not yet acknowledged, across requests; a batch that does
    /// not fit is answered 429 with `Retry-After`.
    #[serde(default = "d_in_flight_events")]
    pub(crate) max_in_flight_events: usize,
    /// How long an acknowledged `metadata.eid` is remembered: a retried batch's events that
    /// Kafka has are not produced again.
    #[serde(default = "d_10m", with = "duration")]
    pub(crate) dedup_window: Duration,
    /// Remembered eids at most (the oldest leave first).
    #[serde(default = "d_dedup")]
    pub(crate) dedup_capacity: usize,
    /// How long a publishing request waits for Kafka's acknowledgements before it is
    /// answered 503.
    #[serde(default = "d_10s", with = "duration")]
    pub(crate) ack_timeout: Duration,
    #[serde(default = "d_30s", with = "duration")]
    pub(crate) shutdown_grace: Duration,
}

/// `[lake]`: the change history as Apache Iceberg tables (docs/lake.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LakeConfig {
    /// `file:///path` (or a plain absolute path): the warehouse folder.
    #[serde(default = "d_warehouse")]
    pub(crate) warehouse: String,
    /// The SQL catalog's database; default: `sink.dsn`, the ODS.
    #[serde(default)]
    pub(crate) catalog_dsn: Option<String>,
    /// An S3-compatible store's URL (`http://host:port`); `None`: AWS S3.
    #[serde(default)]
    pub(crate) s3_endpoint: Option<String>,
    #[serde(default = "d_region")]
    pub(crate) s3_region: String,
    /// `None`: the AWS defaults (environment, profile, instance role).
    #[serde(default)]
    pub(crate) s3_access_key_id: Option<String>,
    #[serde(default)]
    pub(crate) s3_secret_access_key: Option<String>,
    /// Path-style addressing; `None`: on with `s3_endpoint`, off for AWS.
    #[serde(default)]
    pub(crate) s3_path_style: Option<bool>,
    #[serde(default = "d_saiki")]
    pub(crate) catalog_name: String,
    #[serde(default = "d_saiki")]
    pub(crate) namespace: String,
    #[serde(default = "d_lake_group")]
    pub(crate) group: String,
    #[serde(default)]
    pub(crate) instance_id: Option<String>,
    /// Regex over topic names; `None` = every topic of `kafka.topic_prefix`.
    #[serde(default)]
    pub(crate) topics: Option<String>,
    #[serde(default = "d_file_size")]
    pub(crate) target_file_size: usize,
    #[serde(default = "d_60s", with = "duration")]
    pub(crate) commit_interval: Duration,
    /// Keep the event API's events as `{namespace}.ev_{type}` tables (layouts from the
    /// registry at `ingest.dsn`, else `catalog_dsn`); false: events are skipped.
    #[serde(default = "d_true")]
    pub(crate) events: bool,
    /// Snapshots older than this expire (the current one always stays).
    #[serde(default = "d_week", with = "duration")]
    pub(crate) snapshot_retention: Duration,
    #[serde(default = "d_30s", with = "duration")]
    pub(crate) reconnect_backoff_max: Duration,
    #[serde(default = "d_30s", with = "duration")]
    pub(crate) shutdown_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpConfig {
    #[serde(default = "d_listen")]
    pub(crate) listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: d_listen() }
    }
}

/// `source.snapshot`: whether the relay snapshots the captured tables when it creates the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SnapshotMode {
    /// Only changes from the slot's creation on (existing rows: `saiki-relay snapshot`).
    #[default]
    Never,
    /// Every captured table, chunk by chunk, once the slot is created.
    Initial,
}

/// `sink.on_drop`: what the ODS does with a column or table that every source dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OnDrop {
    /// It leaves the ODS too (DESIGN.md §7): the ODS stays equal to the sources.
    #[default]
    Drop,
    /// It stays, with the values it had (history kept; new rows have it null).
    Keep,
}

/// `log.format` and `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines (colours on a terminal only).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogConfig {
    #[serde(default)]
    pub(crate) format: LogFormat,
    /// A `tracing` filter (`info`, `saiki_relay=debug,info`), checked when the config loads.
    #[serde(default = "d_info", deserialize_with = "log_filter")]
    pub(crate) level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: d_info(),
        }
    }
}

/// A `log.level` that `tracing_subscriber::EnvFilter` accepts, or a configuration error.
fn log_filter<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    tracing_subscriber::EnvFilter::try_new(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "log.level = {s:?} is not a tracing filter ({e}): use a level (error, warn, info, debug, trace) or directives like \"saiki_relay=debug,info\""
        ))
    })?;
    Ok(s)
}

fn d_10s() -> Duration {
    Duration::from_secs(10)
}
fn d_1s() -> Duration {
    Duration::from_secs(1)
}
fn d_30s() -> Duration {
    Duration::from_secs(30)
}
fn d_24h() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn d_5s() -> Duration {
    Duration::from_secs(5)
}
fn d_10ms() -> Duration {
    Duration::from_millis(10)
}
fn d_60s() -> Duration {
    Duration::from_secs(60)
}
fn d_warehouse() -> String {
    "file:///var/lib/saiki/lake".into()
}
fn d_saiki() -> String {
    "saiki".into()
}
fn d_lake_group() -> String {
    "saiki-lake".into()
}
fn d_file_size() -> usize {
    64 << 20
}
fn d_ods() -> String {
    "ods".into()
}
fn d_group() -> String {
    "saiki-ods".into()
}
fn d_batch_rows() -> usize {
    10_000
}
fn d_batch_bytes() -> usize {
    32 << 20
}
fn d_true() -> bool {
    true
}
fn d_chunk_rows() -> usize {
    10_000
}
fn d_in_flight() -> usize {
    100_000
}
fn d_batch() -> usize {
    65_536
}
fn d_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn d_prefix() -> String {
    "saiki".into()
}
fn d_template() -> String {
    "{prefix}.{schema}.{table}".into()
}
fn d_one() -> i32 {
    1
}
fn d_in_flight_events() -> usize {
    10_000
}
fn d_5m() -> Duration {
    Duration::from_secs(300)
}
fn d_10m() -> Duration {
    Duration::from_secs(600)
}
fn d_dedup() -> usize {
    1_000_000
}
fn d_ingest_listen() -> String {
    "127.0.0.1:8080".into()
}
fn d_body() -> usize {
    1 << 20
}
fn d_events() -> usize {
    1000
}
fn d_week() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn d_region() -> String {
    "us-east-1".into()
}
fn d_listen() -> String {
    "127.0.0.1:9187".into()
}
fn d_info() -> String {
    "info".into()
}

/// Parses "10s", "50ms", "2m", "1h", "0s".
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like \"10s\" or \"50ms\""))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("'{s}' has no unit: use ms, s, m or h")),
    })
}

mod duration {
    use super::*;
    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Applies `SAIKI_<SECTION>_<KEY>=value` variables to a parsed TOML document. The value is
/// read as TOML if it parses as a TOML value (`true`, `10`, `["a", "b"]`), as a string
/// otherwise. `SAIKI_KAFKA_PROPERTIES_<NAME>` sets librdkafka property `<name>` with `_`
/// read as `.` (`SAIKI_KAFKA_PROPERTIES_COMPRESSION_TYPE=lz4`).
///
/// Returns warnings for `SAIKI_*` variables of no known section (left alone: other tools may
/// use the prefix; a mistyped section shows up in the warning). An unknown *key* of a known
/// section is an error, like an unknown key in the file.
pub(crate) fn apply_env(
    doc: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, RelayError> {
    const SECTIONS: [&str; 7] = ["source", "kafka", "sink", "ingest", "lake", "http", "log"];
    let mut warnings = Vec::new();
    for (k, v) in vars {
        let Some(rest) = k.strip_prefix("SAIKI_") else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        let Some(section) = SECTIONS
            .iter()
            .find(|s| lower.starts_with(&format!("{s}_")))
        else {
            warnings.push(format!(
                "ignoring environment variable {k}: not SAIKI_SOURCE_…, SAIKI_KAFKA_…, SAIKI_SINK_…, SAIKI_INGEST_…, SAIKI_LAKE_…, SAIKI_HTTP_… or SAIKI_LOG_…"
            ));
            continue;
        };
        let key = &lower[section.len() + 1..];
        let value: toml::Value = format!("x = {v}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("x"))
            .unwrap_or_else(|| toml::Value::String(v.clone()));
        let sec = doc
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let sec = sec
            .as_table_mut()
            .ok_or_else(|| RelayError::Config(format!("[{section}] is not a table")))?;
        if *section == "kafka" {
            if let Some(prop) = key.strip_prefix("properties_") {
                let props = sec
                    .entry("properties")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let Some(t) = props.as_table_mut() {
                    t.insert(prop.replace('_', "."), toml::Value::String(v.clone()));
                }
                continue;
            }
        }
        sec.insert(key.to_string(), value);
    }
    Ok(warnings)
}

impl Config {
    /// Reads the file (if any), applies the environment, and checks the result.
    pub(crate) fn load(
        path: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, RelayError> {
        let mut doc = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    RelayError::Config(format!("cannot read config file {}: {e}", p.display()))
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| RelayError::Config(format!("{}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        for w in apply_env(&mut doc, env)? {
            eprintln!("saiki-relay: {w}");
        }
        let cfg: Config = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| RelayError::Config(format!("configuration: {e}")))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults are written twice, in the reference (`--help-config`) and in serde's
    /// defaults: every key of the reference must hold its default, but the examples of keys
    /// that have none (names, DSNs, optional keys).
    #[test]
    fn the_reference_shows_the_parsed_defaults() {
        let reference: Config = toml::from_str(REFERENCE).unwrap();
        let mut minimal: Config =
            toml::from_str("[source]\nname = \"x\"\ndsn = \"x\"\n[sink]\ndsn = \"x\"\n").unwrap();
        let (rs, ms) = (
            reference.source.as_ref().unwrap(),
            minimal.source.as_mut().unwrap(),
        );
        ms.name.clone_from(&rs.name);
        ms.dsn.clone_from(&rs.dsn);
        ms.slot.clone_from(&rs.slot);
        let (rk, mk) = (
            reference.sink.as_ref().unwrap(),
            minimal.sink.as_mut().unwrap(),
        );
        mk.dsn.clone_from(&rk.dsn);
        mk.instance_id.clone_from(&rk.instance_id);
        mk.topics.clone_from(&rk.topics);
        mk.dead_letter_topic.clone_from(&rk.dead_letter_topic);
        minimal.ingest.clone_from(&reference.ingest);
        let l = toml::from_str::<Config>("[lake]\n").unwrap();
        let (rl, mut ml) = (reference.lake.as_ref().unwrap(), l.lake.unwrap());
        ml.catalog_dsn.clone_from(&rl.catalog_dsn);
        ml.s3_endpoint.clone_from(&rl.s3_endpoint);
        ml.s3_access_key_id.clone_from(&rl.s3_access_key_id);
        ml.s3_secret_access_key.clone_from(&rl.s3_secret_access_key);
        ml.s3_path_style.clone_from(&rl.s3_path_style);
        ml.instance_id.clone_from(&rl.instance_id);
        ml.topics.clone_from(&rl.topics);
        assert_eq!(format!("{ml:?}"), format!("{rl:?}"));
        minimal.lake.clone_from(&reference.lake);
        let i = toml::from_str::<Config>("[ingest]\n").unwrap();
        let (ri, mut mi) = (reference.ingest.as_ref().unwrap(), i.ingest.unwrap());
        mi.dsn.clone_from(&ri.dsn);
        mi.admin_token.clone_from(&ri.admin_token);
        assert_eq!(format!("{mi:?}"), format!("{ri:?}"));
        assert_eq!(format!("{minimal:#?}"), format!("{reference:#?}"));
        assert_eq!(
            format!("{:?}", Config::default().kafka),
            format!("{:?}", reference.kafka)
        );
    }

    #[test]
    fn typos_in_enumerated_and_filter_keys_are_configuration_errors() {
        let err = |t: &str| toml::from_str::<Config>(t).unwrap_err().to_string();
        assert!(err("[log]\nformat = \"jsno\"\n").contains("json"));
        assert!(err("[log]\nlevel = \"saiki_relay=loud\"\n").contains("not a tracing filter"));
        assert!(
            err("[source]\nname=\"a\"\ndsn=\"x\"\nsnapshot = \"inital\"\n").contains("initial")
        );
        let ok: Config = toml::from_str(
            "[log]\nformat = \"json\"\nlevel = \"saiki_relay=debug,info\"\n[source]\nname=\"a\"\ndsn=\"x\"\nsnapshot = \"initial\"\n",
        )
        .unwrap();
        assert_eq!(ok.log.format, LogFormat::Json);
        assert_eq!(ok.source.unwrap().snapshot, SnapshotMode::Initial);
    }

    #[test]
    fn the_reference_parses_and_names_every_key() {
        let cfg: Config = toml::from_str(REFERENCE).expect("the reference is a valid config");
        let s = cfg.source.unwrap();
        assert_eq!(s.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(cfg.kafka.topic_template, "{prefix}.{schema}.{table}");
        let sink = cfg.sink.unwrap();
        assert_eq!(sink.batch_linger, Duration::from_millis(10));
        assert_eq!(sink.topics.as_deref(), Some("^saiki\\..*"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut doc: toml::Table =
            toml::from_str("[source]\nname = \"a\"\ndsn = \"host=x\"\n").unwrap();
        apply_env(
            &mut doc,
            [
                (
                    "SAIKI_SOURCE_DSN".to_string(),
                    "host=y dbname=z".to_string(),
                ),
                ("SAIKI_SOURCE_MAX_IN_FLIGHT".to_string(), "5".to_string()),
                (
                    "SAIKI_SOURCE_TABLES".to_string(),
                    "[\"public.*\"]".to_string(),
                ),
                (
                    "SAIKI_KAFKA_PROPERTIES_COMPRESSION_TYPE".to_string(),
                    "lz4".to_string(),
                ),
                ("PATH".to_string(), "/bin".to_string()),
            ],
        )
        .unwrap();
        let cfg: Config = toml::Value::Table(doc).try_into().unwrap();
        let s = cfg.source.unwrap();
        assert_eq!(s.dsn, "host=y dbname=z");
        assert_eq!(s.max_in_flight, 5);
        assert_eq!(s.tables, vec!["public.*"]);
        assert_eq!(cfg.kafka.properties["compression.type"], "lz4");
    }

    #[test]
    fn unknown_keys_are_errors_and_unknown_sections_warnings() {
        assert!(
            toml::from_str::<Config>("[source]\nname=\"a\"\ndsn=\"x\"\nslto=\"typo\"\n").is_err()
        );
        let mut doc = toml::Table::new();
        let w = apply_env(&mut doc, [("SAIKI_SOURC_DSN".to_string(), "x".to_string())]).unwrap();
        assert!(w[0].contains("SAIKI_SOURC_DSN"), "{w:?}");
        assert!(doc.is_empty());
        let mut doc = toml::Table::new();
        apply_env(
            &mut doc,
            [("SAIKI_SOURCE_SLTO".to_string(), "x".to_string())],
        )
        .unwrap();
        assert!(
            toml::Value::Table(doc).try_into::<Config>().is_err(),
            "unknown key of a known section"
        );
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ten s").is_err());
    }
}
