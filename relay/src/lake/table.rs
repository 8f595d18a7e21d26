//! The lake's Iceberg I/O: the SQL catalog, a change-log table's columns as the lake knows
//! them, and one commit of a round's rows (Parquet files through iceberg's writers, a fast
//! append whose snapshot summary holds the table's marks).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iceberg::arrow::{schema_to_arrow_schema, RecordBatchPartitionSplitter};
use iceberg::io::{
    FileIOBuilder, LocalFsStorageFactory, StorageFactory, S3_ACCESS_KEY_ID, S3_ENDPOINT,
    S3_PATH_STYLE_ACCESS, S3_REGION, S3_SECRET_ACCESS_KEY,
};
use iceberg::spec::{
    DataFileFormat, NestedField, PrimitiveType, Schema, Transform, Type, UnboundPartitionSpec,
};
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::partitioning::fanout_writer::FanoutWriter;
use iceberg::writer::partitioning::PartitioningWriter;
use iceberg::{Catalog as _, CatalogBuilder, ErrorKind, NamespaceIdent, TableCreation, TableIdent};
use iceberg_catalog_sql::{SqlBindStyle, SqlCatalog, SqlCatalogBuilder};
use iceberg_storage_opendal::OpenDalStorageFactory;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use tracing::{info, warn};

use super::columns::{self, Row};
use super::ledger::{decode_marks, encode_marks, Ledger, Marks, SUMMARY_KEY};
use super::schema::{self, LoggedChange, LOG_PROPERTY};
use super::LakeRuntime;
use crate::config::{LakeConfig, OnDrop};
use crate::error::RelayError;
use crate::evolve::{Pos, SchemaLog, Step};
use crate::pg::dsn::Dsn;
use crate::pg::tls::SslMode;

/// Commit attempts of one table before the round fails (and is read again).
const COMMIT_ATTEMPTS: usize = 10;

/// An Iceberg error of the lake: transient (the session starts again and reads the round
/// again; nothing was committed past what the tables hold).
fn lake_err(what: &str, e: iceberg::Error) -> RelayError {
    RelayError::Lake {
        message: format!("{what}: {e}"),
        transient: true,
    }
}

/// The catalog DSN's TLS files, read once at start as the relay's other connections read
/// them: a missing or unreadable file, or a certificate without its key, is a configuration
/// error rather than a connection retried forever.
pub(crate) fn check_catalog_tls(dsn: &str) -> Result<(), RelayError> {
    let d = Dsn::parse(dsn).map_err(|e| RelayError::Config(format!("lake.catalog_dsn: {e}")))?;
    if d.tls.mode.tries_tls()
        && (d.tls.rootcert.is_some() || d.tls.cert.is_some() || d.tls.key.is_some())
    {
        d.tls
            .client_config()
            .map_err(|e| RelayError::Config(format!("lake.catalog_dsn: {e}")))?;
    }
    Ok(())
}

/// An `L` record: its source and position.
type RecordKey = (String, saiki_core::Lsn, i64);

/// The catalog database as sqlx's URL, with the DSN's TLS settings (libpq's names, which
/// sqlx reads with libpq's meaning).
pub(crate) fn catalog_url(dsn: &str) -> Result<String, RelayError> {
    let d = Dsn::parse(dsn).map_err(|e| RelayError::Config(format!("lake.catalog_dsn: {e}")))?;
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    let auth = match &d.password {
        Some(p) => format!("{}:{}", enc(&d.user), enc(p)),
        None => enc(&d.user),
    };
    let mut query = Vec::new();
    if d.host.starts_with('/') {
        query.push(format!("host={}", enc(&d.host)));
    }
    let tls = &d.tls;
    if tls.mode == SslMode::VerifyCa {
        return Err(RelayError::Config(
            "lake.catalog_dsn: sslmode=verify-ca is not offered for the catalog database: its connections (sqlx, under iceberg's SQL catalog) trust the system's CAs besides sslrootcert, so without the host-name check any publicly issued certificate would pass. Use sslmode=verify-full".into(),
        ));
    }
    // Always said, so that sqlx does not take it from PGSSLMODE (the relay reads no
    // environment of libpq's).
    query.push(format!("sslmode={}", tls.mode.as_str()));
    for (key, path) in [
        ("sslrootcert", &tls.rootcert),
        ("sslcert", &tls.cert),
        ("sslkey", &tls.key),
    ] {
        if let Some(p) = path {
            query.push(format!("{key}={}", enc(&p.to_string_lossy())));
        }
    }
    let host = if d.host.starts_with('/') {
        "localhost"
    } else {
        &d.host
    };
    let query = match query.is_empty() {
        true => String::new(),
        false => format!("?{}", query.join("&")),
    };
    Ok(format!(
        "postgres://{auth}@{host}:{}/{}{query}",
        d.port,
        enc(&d.dbname)
    ))
}

/// Where the lake's data and metadata files go.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Warehouse {
    /// `file:///path`: a local folder (or a volume mounted there).
    Local { url: String },
    /// `s3://bucket/prefix` on AWS S3 or any S3-compatible store, with the FileIO
    /// properties (iceberg's and PyIceberg's keys: `s3.endpoint`, `s3.region`, ...).
    S3 {
        url: String,
        bucket: String,
        props: HashMap<String, String>,
    },
}

impl Warehouse {
    /// Reads `lake.warehouse` and the `lake.s3_*` keys.
    pub(crate) fn from_config(lake: &LakeConfig) -> Result<Warehouse, RelayError> {
        let w = lake.warehouse.trim();
        if let Some(rest) = w.strip_prefix("s3://") {
            let bucket = rest.split('/').next().unwrap_or("");
            if bucket.is_empty() {
                return Err(RelayError::Config(format!(
                    "lake.warehouse = {w:?}: name the bucket (s3://bucket/prefix)"
                )));
            }
            let mut props = HashMap::from([(S3_REGION.to_string(), lake.s3_region.clone())]);
            if let Some(e) = &lake.s3_endpoint {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(RelayError::Config(format!(
                        "lake.s3_endpoint = {e:?}: give a URL (http://127.0.0.1:9000)"
                    )));
                }
                props.insert(S3_ENDPOINT.to_string(), e.trim_end_matches('/').to_string());
            }
            match (&lake.s3_access_key_id, &lake.s3_secret_access_key) {
                (Some(id), Some(secret)) => {
                    props.insert(S3_ACCESS_KEY_ID.to_string(), id.clone());
                    props.insert(S3_SECRET_ACCESS_KEY.to_string(), secret.clone());
                }
                (None, None) => {}
                _ => {
                    return Err(RelayError::Config(
                        "lake.s3_access_key_id and lake.s3_secret_access_key go together: set both, or neither for the AWS defaults".into(),
                    ))
                }
            }
            let path_style = lake.s3_path_style.unwrap_or(lake.s3_endpoint.is_some());
            props.insert(S3_PATH_STYLE_ACCESS.to_string(), path_style.to_string());
            return Ok(Warehouse::S3 {
                url: format!("s3://{}", rest.trim_end_matches('/')),
                bucket: bucket.to_string(),
                props,
            });
        }
        if w.contains("://") && !w.starts_with("file://") {
            return Err(RelayError::Config(format!(
                "lake.warehouse = {w:?}: give a local folder (file:///var/lib/saiki/lake) or an S3 bucket (s3://bucket/prefix)"
            )));
        }
        let path = w.strip_prefix("file://").unwrap_or(w);
        if !path.starts_with('/') {
            return Err(RelayError::Config(format!(
                "lake.warehouse = {w:?}: give an absolute folder (file:///var/lib/saiki/lake)"
            )));
        }
        Ok(Warehouse::Local {
            url: format!("file://{}", path.trim_end_matches('/')),
        })
    }

    /// The warehouse's URL, as the catalog stores table locations under it.
    pub(crate) fn url(&self) -> &str {
        match self {
            Warehouse::Local { url } | Warehouse::S3 { url, .. } => url,
        }
    }

    /// The storage of the warehouse's scheme, and the properties its FileIO needs.
    fn storage(&self) -> (Arc<dyn StorageFactory>, HashMap<String, String>) {
        match self {
            Warehouse::Local { .. } => (Arc::new(LocalFsStorageFactory), HashMap::new()),
            Warehouse::S3 { props, .. } => (
                Arc::new(OpenDalStorageFactory::S3 {
                    customized_credential_load: None,
                }),
                props.clone(),
            ),
        }
    }

    /// Checks that the warehouse can be written: a probe file written and deleted. A
    /// refusal (no permission, no such bucket, bad credentials) is definite and names the
    /// warehouse; a store that does not answer is transient.
    async fn check_writable(&self) -> Result<(), RelayError> {
        let (url, bucket) = match self {
            Warehouse::Local { url } => return check_writable(url.trim_start_matches("file://")),
            Warehouse::S3 { url, bucket, .. } => (url, bucket),
        };
        let (factory, props) = self.storage();
        let io = FileIOBuilder::new(factory).with_props(props).build();
        let probe = format!("{url}/.saiki-probe-{}", std::process::id());
        let written = match io.new_output(&probe) {
            Ok(out) => out.write(bytes::Bytes::from_static(b"saiki")).await,
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => {
                if let Err(e) = io.delete(&probe).await {
                    warn!(%probe, error = %e, "the warehouse's probe file could not be deleted: housekeeping (snapshot expiry) needs s3:DeleteObject");
                }
                Ok(())
            }
            Err(e) => match refusal(&e) {
                Some(why) => Err(RelayError::Lake {
                    message: format!(
                        "the warehouse {url} cannot be written ({why}: {e}): create bucket {bucket:?} in lake.s3_region, give the relay credentials (lake.s3_access_key_id or the AWS defaults) with s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket there, or set lake.warehouse"
                    ),
                    transient: false,
                }),
                None => Err(lake_err(&format!("the warehouse {url} does not answer"), e)),
            },
        }
    }
}

/// The catalog as a commit of marks sees it. iceberg's `Transaction::commit` loads the table
/// again and, if another lake relay committed meanwhile, applies the append to the newer
/// snapshot with the snapshot properties it was given: our marks, computed from the older
/// one, would undo the other relay's marks of its partitions (and a restart of that relay
/// would then write its messages twice). Here `load_table` of the table being committed
/// answers the table the marks came from, so nothing is applied to another snapshot: the
/// catalog's own check of the base snapshot refuses the commit as a conflict, and
/// `Catalog::commit` reads the marks again. Everything else goes to the catalog.
#[derive(Debug)]
struct Pinned<'a> {
    catalog: &'a SqlCatalog,
    table: &'a iceberg::table::Table,
}

#[async_trait::async_trait]
impl iceberg::Catalog for Pinned<'_> {
    async fn list_namespaces(
        &self,
        parent: Option<&NamespaceIdent>,
    ) -> iceberg::Result<Vec<NamespaceIdent>> {
        self.catalog.list_namespaces(parent).await
    }
    async fn create_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> iceberg::Result<iceberg::Namespace> {
        self.catalog.create_namespace(namespace, properties).await
    }
    async fn get_namespace(
        &self,
        namespace: &NamespaceIdent,
    ) -> iceberg::Result<iceberg::Namespace> {
        self.catalog.get_namespace(namespace).await
    }
    async fn namespace_exists(&self, namespace: &NamespaceIdent) -> iceberg::Result<bool> {
        self.catalog.namespace_exists(namespace).await
    }
    async fn update_namespace(
        &self,
        namespace: &NamespaceIdent,
        properties: HashMap<String, String>,
    ) -> iceberg::Result<()> {
        self.catalog.update_namespace(namespace, properties).await
    }
    async fn drop_namespace(&self, namespace: &NamespaceIdent) -> iceberg::Result<()> {
        self.catalog.drop_namespace(namespace).await
    }
    async fn list_tables(&self, namespace: &NamespaceIdent) -> iceberg::Result<Vec<TableIdent>> {
        self.catalog.list_tables(namespace).await
    }
    async fn create_table(
        &self,
        namespace: &NamespaceIdent,
        creation: TableCreation,
    ) -> iceberg::Result<iceberg::table::Table> {
        self.catalog.create_table(namespace, creation).await
    }
    async fn load_table(&self, table: &TableIdent) -> iceberg::Result<iceberg::table::Table> {
        if table == self.table.identifier() {
            Ok(self.table.clone())
        } else {
            self.catalog.load_table(table).await
        }
    }
    async fn drop_table(&self, table: &TableIdent) -> iceberg::Result<()> {
        self.catalog.drop_table(table).await
    }
    async fn purge_table(&self, table: &TableIdent) -> iceberg::Result<()> {
        self.catalog.purge_table(table).await
    }
    async fn table_exists(&self, table: &TableIdent) -> iceberg::Result<bool> {
        self.catalog.table_exists(table).await
    }
    async fn rename_table(&self, src: &TableIdent, dest: &TableIdent) -> iceberg::Result<()> {
        self.catalog.rename_table(src, dest).await
    }
    async fn register_table(
        &self,
        table: &TableIdent,
        metadata_location: String,
    ) -> iceberg::Result<iceberg::table::Table> {
        self.catalog.register_table(table, metadata_location).await
    }
    async fn update_table(
        &self,
        commit: iceberg::TableCommit,
    ) -> iceberg::Result<iceberg::table::Table> {
        self.catalog.update_table(commit).await
    }
}

/// How often a table's snapshots are looked at for expiry: every `retention`, at most hourly.
fn expiry_every(retention: Duration) -> Duration {
    retention.min(Duration::from_secs(3600))
}

/// The snapshots of a table's history (oldest first) that stopped being current before
/// `cutoff_ms`: their successor became current then. The last one is current and stays.
fn replaced_before(history: &[iceberg::spec::SnapshotLog], cutoff_ms: i64) -> Vec<i64> {
    history
        .windows(2)
        .filter(|w| w[1].timestamp_ms < cutoff_ms)
        .map(|w| w[0].snapshot_id)
        .collect()
}

/// The metadata files `before` knew (its log and its own) that `after` no longer does.
fn dropped_metadata(before: &iceberg::table::Table, after: &iceberg::table::Table) -> Vec<String> {
    let known = |t: &iceberg::table::Table| -> Vec<String> {
        t.metadata()
            .metadata_log()
            .iter()
            .map(|l| l.metadata_file.clone())
            .chain(t.metadata_location().map(str::to_string))
            .collect()
    };
    let now = known(after);
    known(before)
        .into_iter()
        .filter(|f| !now.contains(f))
        .collect()
}

/// The TLS failure under an error of the SQL catalog, if that is what it is: sqlx's `Tls`
/// (a server without TLS under `sslmode=require`), or rustls refusing the handshake (a
/// certificate not trusted, a name that does not match), which sqlx hands on as I/O.
fn tls_refused(e: &iceberg::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        match c.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Tls(tls)) => return Some(tls.to_string()),
            Some(sqlx::Error::Io(io)) => {
                if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    return Some(tls.to_string());
                }
            }
            _ => {}
        }
        cause = c.source();
    }
    None
}

/// Why the store refused a write, if it did (as opposed to not answering).
fn refusal(e: &iceberg::Error) -> Option<&'static str> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(o) = s.downcast_ref::<opendal::Error>() {
            return match o.kind() {
                opendal::ErrorKind::PermissionDenied => Some("permission denied"),
                // opendal reads S3's NoSuchBucket as a configuration error.
                opendal::ErrorKind::NotFound | opendal::ErrorKind::ConfigInvalid
                    if format!("{o:?}").contains("NoSuchBucket") =>
                {
                    Some("no such bucket")
                }
                opendal::ErrorKind::NotFound => Some("not found"),
                opendal::ErrorKind::ConfigInvalid => Some("invalid configuration"),
                // Anything else the store answered and opendal would not retry (a bucket of
                // another region, a request that cannot be signed without credentials).
                _ if o.is_permanent() => Some("refused"),
                _ => None,
            };
        }
        source = s.source();
    }
    None
}

/// A change-log table as the lake knows it: its columns after the `_saiki_*` ones, in the
/// table's order, and how many of them the Iceberg table has (the rest are added at the
/// next commit). The rows of the round in hand.
pub(crate) struct ChangeTable {
    ident: TableIdent,
    columns: Vec<(String, PrimitiveType)>,
    /// Name → index into `columns` (kept by `set_columns` and `column`).
    index: HashMap<String, usize>,
    /// Per column: whether its source type is `json`/`jsonb` (its values stay JSON text), as
    /// far as a record has said this session (Iceberg's schema has only `string`).
    json: Vec<Option<bool>>,
    /// Whether the Iceberg table exists (the lake created or loaded it).
    in_iceberg: bool,
    pub(crate) rows: Vec<Row>,
    /// When this relay last looked for snapshots to expire.
    expired_at: Option<Instant>,
    /// The `L` records the table followed (its `saiki.schema-changes` property and this
    /// round's): how a row of a source that has not renamed a column yet is read.
    log: SchemaLog,
    /// This round's column renames (with the `L` record each came from) and `L` records,
    /// for the next commit.
    renames: Vec<(RecordKey, (String, String))>,
    logged: Vec<LoggedChange>,
}

impl ChangeTable {
    pub(crate) fn new(namespace: &str, name: &str) -> Self {
        ChangeTable {
            ident: TableIdent::new(NamespaceIdent::new(namespace.to_string()), name.to_string()),
            columns: Vec::new(),
            index: HashMap::new(),
            json: Vec::new(),
            in_iceberg: false,
            rows: Vec::new(),
            expired_at: None,
            log: SchemaLog::new(OnDrop::Keep),
            renames: Vec::new(),
            logged: Vec::new(),
        }
    }

    /// The name the table's [`SchemaLog`] knows it by (each table has a log of its own; no
    /// source table is named "", so a table rename in the log never moves it).
    const LOG_TABLE: &'static str = "";

    /// An `L` record of `source` at `at` for this table: a column rename renames the
    /// column (its field keeps its id), a type change that Iceberg can widen to widens it,
    /// from this record on; both reach the Iceberg table at the next commit, with the
    /// record in the table's properties. False if the table followed the record already.
    pub(crate) fn schema_change(
        &mut self,
        source: &str,
        at: Pos,
        changes: Vec<saiki_core::ddl::Change>,
    ) -> bool {
        self.take_schema_change(source, at, changes, true)
    }

    /// `schema_change`, for a record the Iceberg table has already followed too
    /// (`pending` false): the lake's names, types and log follow it, and the next commit
    /// has nothing of it to do.
    fn take_schema_change(
        &mut self,
        source: &str,
        at: Pos,
        changes: Vec<saiki_core::ddl::Change>,
        pending: bool,
    ) -> bool {
        let Some(steps) = self.log.record(Self::LOG_TABLE, source, at, &changes) else {
            return false;
        };
        let key: RecordKey = (source.to_string(), at.0, at.1);
        for step in steps {
            match step {
                Step::RenameColumn { from, to } => {
                    if !self.index.contains_key(&to) {
                        if let Some(i) = self.index.remove(&from) {
                            self.columns[i].0.clone_from(&to);
                            self.index.insert(to.clone(), i);
                        }
                    }
                    if pending {
                        self.renames.push((key.clone(), (from, to)));
                    }
                }
                Step::AlterType { column, type_name } => {
                    // A source that has not renamed the column yet says its old name.
                    let column = self
                        .log
                        .column(Self::LOG_TABLE, source, at, &column)
                        .unwrap_or(&column)
                        .to_string();
                    let Some(&i) = self.index.get(&column) else {
                        continue; // met first in a later row, with its new type
                    };
                    let to = columns::iceberg_type(&type_name);
                    if schema::widens(&self.columns[i].1, &to) {
                        self.retype(i, to);
                    } else if self.columns[i].1 != to {
                        warn!(
                            table = %self.ident,
                            column,
                            from = %self.columns[i].1,
                            to = %to,
                            "a type change Iceberg cannot follow (only int → long, float → double and a decimal's precision widen): the column keeps its type, and a value that does not fit it goes to the dead-letter topic"
                        );
                    }
                }
                _ => {}
            }
        }
        if pending {
            self.logged.push(LoggedChange {
                source: source.to_string(),
                lsn: at.0,
                seq: at.1,
                changes,
            });
        }
        true
    }

    /// The `L` records the Iceberg table followed (its property), followed here too: another
    /// relay of the group may have renamed a column that this relay's round still has under
    /// its old name (rows of a partition it reads behind the other). The round's cells stay
    /// with their column, under its new name.
    pub(crate) fn follow(&mut self, followed: Vec<LoggedChange>) {
        for l in followed {
            self.take_schema_change(&l.source, (l.lsn, l.seq), l.changes, false);
        }
    }

    /// The round's renames whose `L` record the Iceberg table has not followed yet (one it
    /// has is in the table already, and applying it again by name could undo a later one:
    /// a swap of two names).
    fn renames_to_commit(&self, followed: &HashSet<RecordKey>) -> Vec<(String, String)> {
        self.renames
            .iter()
            .filter(|(k, _)| !followed.contains(k))
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Whether an `L` record of the round is not in the Iceberg table yet. A table the lake
    /// has not created yet is created for a column rename (so that the record is kept for
    /// the sources that have not renamed yet), not for any other `L` record.
    pub(crate) fn has_schema_work(&self) -> bool {
        !self.logged.is_empty() && (self.in_iceberg || !self.renames.is_empty())
    }

    /// Column `i` takes a wider type; the round's values in it are converted.
    fn retype(&mut self, i: usize, to: PrimitiveType) {
        for r in &mut self.rows {
            for (c, cell) in &mut r.cells {
                if *c == i {
                    columns::widen(cell, &to);
                }
            }
        }
        self.columns[i].1 = to;
    }

    /// The followed `L` records of the table's property, into its log.
    fn read_log(&mut self, property: Option<&String>) -> Result<Vec<LoggedChange>, String> {
        let followed = schema::read_log(property.map(String::as_str))?;
        for l in &followed {
            self.log
                .record(Self::LOG_TABLE, &l.source, (l.lsn, l.seq), &l.changes);
        }
        Ok(followed)
    }

    /// The index and type of a column of a row of `source` at position `at` (a rename that
    /// source has not made yet applies), and whether its values are JSON documents. The first
    /// time the column is met, its type is learned from the record's (`pg`, asked only then;
    /// text if it has none); whether it is JSON, the first time this session a record names
    /// its type.
    pub(crate) fn column<'p>(
        &mut self,
        name: &str,
        (source, at): (&str, Pos),
        pg: impl FnOnce() -> Option<&'p str>,
    ) -> (usize, &PrimitiveType, bool) {
        let is_json = |t: &str| matches!(t, "json" | "jsonb");
        // A source that has not renamed a column yet still names it the old way.
        let mapped;
        let name = match self.log.affects(Self::LOG_TABLE) {
            true => match self.log.column(Self::LOG_TABLE, source, at, name) {
                Some(n) if n != name => {
                    mapped = n.to_string();
                    mapped.as_str()
                }
                _ => name,
            },
            false => name,
        };
        let i = match self.index.get(name) {
            Some(i) => {
                let i = *i;
                if self.json[i].is_none() {
                    self.json[i] = pg().map(is_json);
                }
                i
            }
            None => {
                let t = pg();
                let ty = t.map_or(PrimitiveType::String, columns::iceberg_type);
                self.columns.push((name.to_string(), ty));
                self.json.push(t.map(is_json));
                self.index.insert(name.to_string(), self.columns.len() - 1);
                self.columns.len() - 1
            }
        };
        (i, &self.columns[i].1, self.json[i] == Some(true))
    }

    fn set_columns(&mut self, cols: Vec<(String, PrimitiveType)>) {
        // What is known of a column's JSON-ness goes with its name; the rest is learned from
        // the next record.
        self.json = cols
            .iter()
            .map(|(c, _)| self.index.get(c).and_then(|&i| self.json[i]))
            .collect();
        self.index = cols
            .iter()
            .enumerate()
            .map(|(i, (c, _))| (c.clone(), i))
            .collect();
        self.columns = cols;
    }

    /// The Iceberg schema of a new table: the `_saiki_*` columns (ids 1-6, the list's
    /// element 7), then the table's columns.
    fn schema(&self) -> Result<Schema, iceberg::Error> {
        let mut fields = Vec::new();
        for (i, (name, ty, required)) in columns::system_columns().into_iter().enumerate() {
            let id = i as i32 + 1;
            let ty = match ty {
                Type::List(_) => Type::List(iceberg::spec::ListType::new(
                    NestedField::list_element(7, Type::Primitive(PrimitiveType::String), false)
                        .into(),
                )),
                t => t,
            };
            fields.push(Arc::new(if required {
                NestedField::required(id, name, ty)
            } else {
                NestedField::optional(id, name, ty)
            }));
        }
        for (i, (name, ty)) in self.columns.iter().enumerate() {
            fields.push(Arc::new(NestedField::optional(
                i as i32 + 8,
                name,
                Type::Primitive(ty.clone()),
            )));
        }
        Schema::builder().with_fields(fields).build()
    }
}

pub(crate) struct Catalog {
    catalog: SqlCatalog,
    namespace: NamespaceIdent,
    /// The catalog's database, for the commits iceberg has no action for
    /// ([`Catalog::commit_metadata`]), and the catalog's name there.
    sql: sqlx::PgPool,
    name: String,
}

impl Catalog {
    /// Opens the SQL catalog (creating its tables and the namespace if missing) and checks
    /// that the warehouse can be written.
    pub(crate) async fn open(rt: &LakeRuntime) -> Result<Catalog, RelayError> {
        rt.warehouse.check_writable().await?;
        let (factory, mut props) = rt.warehouse.storage();
        // The lake commits one table at a time: two connections are plenty, and the
        // catalog database is often the ODS.
        props.insert("pool.max-connections".to_string(), "2".to_string());
        let catalog = SqlCatalogBuilder::default()
            .uri(rt.catalog_url.clone())
            .warehouse_location(rt.warehouse.url().to_string())
            .sql_bind_style(SqlBindStyle::DollarNumeric)
            .with_storage_factory(factory)
            .load(rt.lake.catalog_name.clone(), props)
            .await
            .map_err(|e| match tls_refused(&e) {
                // Retrying cannot make a certificate trusted.
                Some(why) => RelayError::Lake {
                    message: format!("TLS to the catalog database failed ({why}): check lake.catalog_dsn's sslmode and sslrootcert (the CA that signed the server's certificate)"),
                    transient: false,
                },
                None => lake_err("opening the SQL catalog (lake.catalog_dsn)", e),
            })?;
        let namespace = NamespaceIdent::new(rt.lake.namespace.clone());
        if !catalog
            .namespace_exists(&namespace)
            .await
            .map_err(|e| lake_err("catalog", e))?
        {
            match catalog.create_namespace(&namespace, HashMap::new()).await {
                Ok(_) => {}
                // Another lake relay made it meanwhile.
                Err(e) if e.kind() == ErrorKind::NamespaceAlreadyExists => {}
                Err(e) => return Err(lake_err("creating the namespace", e)),
            }
        }
        let sql = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy(&rt.catalog_url)
            .map_err(|e| RelayError::Config(format!("lake.catalog_dsn: {e}")))?;
        Ok(Catalog {
            catalog,
            namespace,
            sql,
            name: rt.lake.catalog_name.clone(),
        })
    }

    /// Commits new metadata of `table`, as `edit` makes it from the current one, the way
    /// iceberg's SQL catalog commits (`iceberg-catalog-sql` 0.10.1, `update_table`): iceberg
    /// builds the metadata and writes its file, and the catalog row moves from the current
    /// metadata file to the new one only if it still names the current one. False: another
    /// writer committed first (nothing changed; load the table and try again).
    ///
    /// Why by hand: iceberg-rust 0.10.1 has the builder (`TableMetadataBuilder`) but no
    /// public way to commit what it builds: its `TableCommit` can only come from its own
    /// actions, whose schema update adds and deletes columns and cannot rename or widen one.
    async fn commit_metadata(
        &self,
        table: &iceberg::table::Table,
        edit: impl FnOnce(
            iceberg::spec::TableMetadataBuilder,
        ) -> iceberg::Result<iceberg::spec::TableMetadataBuilder>,
    ) -> Result<bool, RelayError> {
        let ident = table.identifier();
        let what = |e| lake_err(&format!("committing the schema of {ident}"), e);
        let current = table.metadata_location_result().map_err(what)?.to_string();
        let builder = table.metadata().clone().into_builder(Some(current.clone()));
        let metadata = edit(builder)
            .and_then(|b| b.build())
            .map_err(what)?
            .metadata;
        let location = iceberg::MetadataLocation::from_str(&current)
            .map_err(what)?
            .with_next_version()
            .with_new_metadata(&metadata);
        metadata
            .write_to(table.file_io(), &location)
            .await
            .map_err(what)?;
        let moved = sqlx::query(
            "UPDATE iceberg_tables SET metadata_location = $1, previous_metadata_location = $2
             WHERE catalog_name = $3 AND table_namespace = $4 AND table_name = $5
               AND (iceberg_type = 'TABLE' OR iceberg_type IS NULL) AND metadata_location = $2",
        )
        .bind(location.to_string())
        .bind(&current)
        .bind(&self.name)
        .bind(ident.namespace().join("."))
        .bind(ident.name())
        .execute(&self.sql)
        .await
        .map_err(|e| RelayError::Lake {
            message: format!("committing the schema of {ident} in the catalog database: {e}"),
            transient: true,
        })?;
        if moved.rows_affected() == 0 {
            // The file no row names is never read; delete it (a failure leaves it, unread).
            let _ = table.file_io().delete(location.to_string()).await;
            return Ok(false);
        }
        Ok(true)
    }

    /// The table and its marks as its current snapshot has them, with the `L` records it
    /// followed, or `None` if it does not exist yet.
    pub(crate) async fn load(
        &self,
        name: &str,
    ) -> Result<Option<(ChangeTable, Marks, Vec<LoggedChange>)>, RelayError> {
        let ident = TableIdent::new(self.namespace.clone(), name.to_string());
        if !self
            .catalog
            .table_exists(&ident)
            .await
            .map_err(|e| lake_err("catalog", e))?
        {
            return Ok(None);
        }
        let table = self
            .catalog
            .load_table(&ident)
            .await
            .map_err(|e| lake_err(&format!("loading {ident}"), e))?;
        let mut t = ChangeTable::new(&self.namespace.to_url_string(), name);
        t.ident = ident;
        t.set_columns(columns_of(table.metadata().current_schema()));
        t.in_iceberg = true;
        let followed = t
            .read_log(table.metadata().properties().get(LOG_PROPERTY))
            .map_err(|e| RelayError::Lake {
                message: format!("{}: {e}", t.ident),
                transient: false,
            })?;
        Ok(Some((t, current_marks(&table)?, followed)))
    }

    /// Writes the table's rows of the round and commits them with the table's marks.
    /// Returns the number of data files.
    pub(crate) async fn commit(
        &self,
        t: &mut ChangeTable,
        ledger: &mut Ledger,
        target_file_size: usize,
        retention: Duration,
    ) -> Result<usize, RelayError> {
        let name = t.ident.name().to_string();
        let mut table = self.ensure(t).await?;
        // The rows as Arrow, split by day, into Parquet files of the table.
        let schema = table.metadata().current_schema().clone();
        let arrow =
            Arc::new(schema_to_arrow_schema(&schema).map_err(|e| lake_err("arrow schema", e))?);
        let batch = columns::to_batch(&arrow, &t.rows)
            .map_err(|e| RelayError::Internal(format!("{name}: {e}")))?;
        let spec = table.metadata().default_partition_spec().clone();
        let splitter =
            RecordBatchPartitionSplitter::try_new_with_computed_values(schema.clone(), spec)
                .map_err(|e| lake_err("partitions", e))?;
        let parquet = ParquetWriterBuilder::new(
            WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .build(),
            schema.clone(),
        );
        let location = DefaultLocationGenerator::new(table.metadata())
            .map_err(|e| lake_err("data location", e))?;
        let names = DefaultFileNameGenerator::new(
            format!("saiki-{}", uuid::Uuid::new_v4()),
            None,
            DataFileFormat::Parquet,
        );
        let rolling = RollingFileWriterBuilder::new(
            parquet,
            target_file_size,
            table.file_io().clone(),
            location,
            names,
        );
        let mut writer = FanoutWriter::new(DataFileWriterBuilder::new(rolling));
        for (key, part) in splitter
            .split(&batch)
            .map_err(|e| lake_err("splitting by day", e))?
        {
            writer
                .write(key, part)
                .await
                .map_err(|e| lake_err(&format!("writing {name}"), e))?;
        }
        let files = writer
            .close()
            .await
            .map_err(|e| lake_err(&format!("writing {name}"), e))?;
        let count = files.len();
        // The commit: the marks of the table as it is now (another lake relay of the group
        // may have committed other partitions since) moved on by this round's.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = current_marks(&table)?;
            ledger.load(&name, current);
            let marks = ledger.marks_after(&name);
            let props = HashMap::from([(SUMMARY_KEY.to_string(), encode_marks(&marks))]);
            let tx = Transaction::new(&table);
            let action = tx
                .fast_append()
                .add_data_files(files.clone())
                .set_snapshot_properties(props);
            let tx = action.apply(tx).map_err(|e| lake_err("append", e))?;
            let pinned = Pinned {
                catalog: &self.catalog,
                table: &table,
            };
            match tx.commit(&pinned).await {
                Ok(committed) => {
                    ledger.committed(&name);
                    self.tidy(t, &table, committed, retention).await;
                    return Ok(count);
                }
                Err(e)
                    if e.kind() == ErrorKind::CatalogCommitConflicts
                        && attempt < COMMIT_ATTEMPTS =>
                {
                    info!(
                        attempt,
                        "commit conflict (another lake relay committed): again on the new snapshot"
                    );
                    table = self
                        .catalog
                        .load_table(&t.ident)
                        .await
                        .map_err(|e| lake_err("reloading", e))?;
                }
                Err(e) => return Err(lake_err(&format!("committing {name}"), e)),
            }
        }
    }

    /// Housekeeping after a commit. Snapshots that stopped being current more than `retention`
    /// ago expire, at most once per `expiry_every(retention)` and table, and their manifest
    /// lists are deleted: any point in time within `retention` keeps its snapshot. The current
    /// snapshot always stays, and with it the table's marks: an expiry never moves what the
    /// table holds. Metadata files that dropped out of the table's metadata log (Iceberg keeps
    /// the last 100) are deleted too. The data files stay, since fast appends never leave one
    /// unreferenced. A failed expiry is logged and tried again at a later commit; a file whose
    /// delete fails is logged and left (it costs storage, never a change).
    async fn tidy(
        &self,
        t: &mut ChangeTable,
        before: &iceberg::table::Table,
        after: iceberg::table::Table,
        retention: Duration,
    ) {
        let mut stale = dropped_metadata(before, &after);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let cutoff = now_ms.saturating_sub(retention.as_millis() as i64);
        let due = t
            .expired_at
            .is_none_or(|at| at.elapsed() >= expiry_every(retention));
        let meta = after.metadata();
        let expired_ids: Vec<i64> = if due {
            // The log may still name snapshots expired before; only existing ones, never the
            // current one.
            replaced_before(meta.history(), cutoff)
                .into_iter()
                .filter(|id| {
                    meta.snapshot_by_id(*id).is_some() && Some(*id) != meta.current_snapshot_id()
                })
                .collect()
        } else {
            Vec::new()
        };
        if !expired_ids.is_empty() {
            t.expired_at = Some(Instant::now());
            let tx = Transaction::new(&after);
            // By id only (no age cutoff): iceberg's own age rule counts from a snapshot's
            // creation, which would expire the snapshot that was current a moment ago.
            let expire = tx
                .expire_snapshots()
                .expire_snapshot_ids(expired_ids)
                .expire_older_than_ms(i64::MIN)
                .retain_last(1);
            let done = match expire.apply(tx) {
                Ok(tx) => tx.commit(&self.catalog).await,
                Err(e) => Err(e),
            };
            match done {
                Ok(expired) => {
                    let kept: std::collections::HashSet<i64> = expired
                        .metadata()
                        .snapshots()
                        .map(|s| s.snapshot_id())
                        .collect();
                    let gone: Vec<String> = meta
                        .snapshots()
                        .filter(|s| !kept.contains(&s.snapshot_id()))
                        .map(|s| s.manifest_list().to_string())
                        .collect();
                    info!(
                        snapshots = gone.len(),
                        kept = kept.len(),
                        "snapshots past lake.snapshot_retention expired"
                    );
                    stale.extend(gone);
                    stale.extend(dropped_metadata(&after, &expired));
                }
                Err(e) => {
                    warn!(error = %e, "expiring snapshots failed: tried again at a later commit");
                }
            }
        }
        for f in stale {
            if let Err(e) = after.file_io().delete(&f).await {
                warn!(file = %f, error = %e, "a file the table no longer needs was not deleted");
            }
        }
    }

    /// A round's schema changes of a table without rows in the round.
    pub(crate) async fn follow_schema(&self, t: &mut ChangeTable) -> Result<(), RelayError> {
        self.ensure(t).await.map(|_| ())
    }

    /// The Iceberg table, created (partitioned by day of `_saiki_commit_ts`) or evolved to
    /// hold every column the lake knows (`schema::evolve`: columns added, renamed, widened),
    /// with the round's `L` records in its `saiki.schema-changes` property.
    async fn ensure(&self, t: &mut ChangeTable) -> Result<iceberg::table::Table, RelayError> {
        if !t.in_iceberg {
            let schema = t.schema().map_err(|e| lake_err("schema", e))?;
            let spec = UnboundPartitionSpec::builder()
                .add_partition_field(5, format!("{}_day", columns::COMMIT_TS), Transform::Day)
                .map_err(|e| lake_err("partition spec", e))?
                .build();
            let mut properties = HashMap::from([
                ("write.format.default".to_string(), "parquet".to_string()),
                // Conflicts are retried here, with the marks read again (`commit`).
                ("commit.retry.num-retries".to_string(), "0".to_string()),
            ]);
            if !t.logged.is_empty() {
                let log = schema::log_with(None, &t.logged).map_err(RelayError::Internal)?;
                properties.insert(LOG_PROPERTY.to_string(), log);
            }
            let creation = TableCreation::builder()
                .name(t.ident.name().to_string())
                .schema(schema)
                .partition_spec(spec)
                .properties(properties)
                .build();
            let table = match self.catalog.create_table(&self.namespace, creation).await {
                Ok(table) => table,
                // Another lake relay of the group created it meanwhile: evolve it instead.
                Err(e) if e.kind() == ErrorKind::TableAlreadyExists => {
                    t.in_iceberg = true;
                    return Box::pin(self.ensure(t)).await;
                }
                Err(e) => return Err(lake_err(&format!("creating {}", t.ident), e)),
            };
            info!(table = %t.ident, columns = t.columns.len(), "table created");
            t.in_iceberg = true;
            t.renames.clear();
            t.logged.clear();
            return Ok(table);
        };
        let mut attempt = 0;
        let mut committed_on: Option<iceberg::table::Table> = None;
        let table = loop {
            attempt += 1;
            let table = self
                .catalog
                .load_table(&t.ident)
                .await
                .map_err(|e| lake_err(&format!("loading {}", t.ident), e))?;
            if let Some(before) = committed_on.take() {
                // Metadata files our schema commit pushed out of the table's log.
                for f in dropped_metadata(&before, &table) {
                    if let Err(e) = table.file_io().delete(&f).await {
                        warn!(file = %f, error = %e, "a file the table no longer needs was not deleted");
                    }
                }
            }
            let meta = table.metadata();
            // The `L` records another relay of the group followed first (the table's
            // property) are followed here too before this round's rows are written: rows of
            // a partition this relay reads behind the other still say a column's old name.
            let followed = schema::read_log(
                meta.properties().get(LOG_PROPERTY).map(String::as_str),
            )
            .map_err(|e| RelayError::Lake {
                message: format!("{}: {e}", t.ident),
                transient: false,
            })?;
            let keys: HashSet<RecordKey> = followed
                .iter()
                .map(|l| (l.source.clone(), l.lsn, l.seq))
                .collect();
            t.follow(followed);
            let renames = t.renames_to_commit(&keys);
            let next = schema::evolve(
                meta.current_schema(),
                meta.last_column_id(),
                &t.columns,
                &renames,
            )
            .map_err(|e| RelayError::Internal(format!("{}: schema: {e}", t.ident)))?;
            let have_log = meta.properties().get(LOG_PROPERTY);
            let log = match t.logged.is_empty() {
                true => None,
                false => Some(
                    schema::log_with(have_log.map(String::as_str), &t.logged).map_err(|e| {
                        RelayError::Lake {
                            message: format!("{}: {e}", t.ident),
                            transient: false,
                        }
                    })?,
                ),
            }
            .filter(|l| Some(l) != have_log);
            if next.is_none() && log.is_none() {
                break table;
            }
            let fields = next.as_ref().map(|s| s.as_struct().fields().len());
            let committed = self
                .commit_metadata(&table, |mut b| {
                    if let Some(schema) = next {
                        b = b.add_current_schema(schema)?;
                    }
                    if let Some(log) = log {
                        b = b.set_properties(HashMap::from([(LOG_PROPERTY.to_string(), log)]))?;
                    }
                    Ok(b)
                })
                .await?;
            if committed {
                info!(table = %t.ident, ?fields, ?renames, "schema committed");
                committed_on = Some(table);
                continue; // and load the table as committed
            }
            if attempt >= COMMIT_ATTEMPTS {
                return Err(RelayError::Lake {
                    message: format!(
                        "{}: the schema commit lost to other writers {attempt} times",
                        t.ident
                    ),
                    transient: true,
                });
            }
            info!(
                attempt,
                "schema commit conflict (another writer committed): again on the new metadata"
            );
        };
        t.renames.clear();
        t.logged.clear();
        // The lake's columns are the table's, in its order and with its types (another
        // relay may have added a column first, or widened one): the round's cells follow.
        let ordered = columns_of(table.metadata().current_schema());
        if ordered != t.columns {
            let map: Vec<usize> = t
                .columns
                .iter()
                .map(|(c, _)| {
                    ordered
                        .iter()
                        .position(|(n, _)| n == c)
                        .unwrap_or(usize::MAX)
                })
                .collect();
            for r in &mut t.rows {
                for (i, cell) in &mut r.cells {
                    *i = map[*i];
                    if let Some((_, ty)) = ordered.get(*i) {
                        columns::widen(cell, ty);
                    }
                }
            }
            t.set_columns(ordered);
        }
        t.in_iceberg = true;
        Ok(table)
    }
}

/// A change-log table's columns after the six `_saiki_*` ones, in the table's order.
fn columns_of(schema: &Schema) -> Vec<(String, PrimitiveType)> {
    schema
        .as_struct()
        .fields()
        .iter()
        .skip(6)
        .map(|f| {
            let ty = match &*f.field_type {
                Type::Primitive(p) => p.clone(),
                _ => PrimitiveType::String,
            };
            (f.name.clone(), ty)
        })
        .collect()
}

fn current_marks(table: &iceberg::table::Table) -> Result<Marks, RelayError> {
    match table
        .metadata()
        .current_snapshot()
        .and_then(|s| s.summary().additional_properties.get(SUMMARY_KEY).cloned())
    {
        Some(text) => decode_marks(&text).map_err(|e| RelayError::Lake {
            message: format!("{}: {e}", table.identifier()),
            transient: false,
        }),
        None => Ok(Marks::new()),
    }
}

/// A warehouse folder the relay cannot write is a definite error that names it.
fn check_writable(folder: &str) -> Result<(), RelayError> {
    let definite = |e: std::io::Error| {
        RelayError::Lake {
        message: format!(
            "the warehouse folder {folder} cannot be written ({e}): give the relay's user write permission there, or set lake.warehouse"
        ),
        transient: false,
    }
    };
    std::fs::create_dir_all(folder).map_err(definite)?;
    let probe = std::path::Path::new(folder).join(format!(".saiki-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(definite)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_dsn_becomes_a_url() {
        assert_eq!(
            catalog_url("host=127.0.0.1 port=5433 user=postgres dbname=ods").unwrap(),
            "postgres://postgres@127.0.0.1:5433/ods?sslmode=prefer"
        );
        assert_eq!(
            catalog_url("postgres://a%20b:p%40ss@db:5432/ods").unwrap(),
            "postgres://a%20b:p%40ss@db:5432/ods?sslmode=prefer"
        );
        assert!(
            catalog_url("host=db dbname=ods sslmode=verify-ca sslrootcert=/ca.pem")
                .unwrap_err()
                .to_string()
                .contains("verify-full")
        );
        assert_eq!(
            catalog_url("host=db user=u dbname=ods sslmode=verify-full sslrootcert=/etc/ca.pem")
                .unwrap(),
            "postgres://u@db:5432/ods?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem"
        );
        assert_eq!(
            catalog_url("host=/run/postgresql user=u dbname=ods sslmode=disable").unwrap(),
            "postgres://u@localhost:5432/ods?host=%2Frun%2Fpostgresql&sslmode=disable"
        );
    }

    fn lake(toml: &str) -> LakeConfig {
        toml::from_str::<crate::config::Config>(&format!("[lake]\n{toml}"))
            .unwrap()
            .lake
            .unwrap()
    }

    #[test]
    fn a_local_warehouse_is_an_absolute_folder() {
        let url = |w: &str| Warehouse::from_config(&lake(&format!("warehouse = {w:?}")));
        assert_eq!(url("/var/lake/").unwrap().url(), "file:///var/lake");
        assert_eq!(url("file:///var/lake").unwrap().url(), "file:///var/lake");
        assert!(url("lake").unwrap_err().to_string().contains("absolute"));
        assert!(url("gs://b/p").unwrap_err().to_string().contains("s3://"));
    }

    #[test]
    fn an_s3_warehouse_takes_its_endpoint_keys_and_addressing_from_the_config() {
        let w = Warehouse::from_config(&lake(
            "warehouse = \"s3://lake/saiki/\"\ns3_endpoint = \"http://127.0.0.1:9000/\"\ns3_access_key_id = \"a\"\ns3_secret_access_key = \"b\"",
        ))
        .unwrap();
        let Warehouse::S3 { url, bucket, props } = w else {
            panic!("not s3")
        };
        assert_eq!((url.as_str(), bucket.as_str()), ("s3://lake/saiki", "lake"));
        assert_eq!(props[S3_ENDPOINT], "http://127.0.0.1:9000");
        assert_eq!(
            props[S3_PATH_STYLE_ACCESS], "true",
            "path style with an endpoint"
        );
        assert_eq!(props[S3_REGION], "us-east-1");
        assert_eq!(props[S3_SECRET_ACCESS_KEY], "b");
        let Warehouse::S3 { props, .. } =
            Warehouse::from_config(&lake("warehouse = \"s3://lake\"")).unwrap()
        else {
            panic!("not s3")
        };
        assert_eq!(props[S3_PATH_STYLE_ACCESS], "false", "AWS: virtual hosts");
        assert!(
            !props.contains_key(S3_ACCESS_KEY_ID),
            "AWS's own credentials"
        );
        for (bad, says) in [
            ("warehouse = \"s3:///p\"", "bucket"),
            (
                "warehouse = \"s3://b\"\ns3_endpoint = \"127.0.0.1:9000\"",
                "URL",
            ),
            ("warehouse = \"s3://b\"\ns3_access_key_id = \"a\"", "both"),
        ] {
            let e = Warehouse::from_config(&lake(bad)).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_snapshot_expires_once_its_successor_is_older_than_the_retention() {
        let log = |v: &[(i64, i64)]| -> Vec<iceberg::spec::SnapshotLog> {
            v.iter()
                .map(|(id, ts)| iceberg::spec::SnapshotLog {
                    snapshot_id: *id,
                    timestamp_ms: *ts,
                })
                .collect()
        };
        // Snapshot 1 was replaced at 100, 2 at 200; 3 is current.
        let h = log(&[(1, 10), (2, 100), (3, 200)]);
        assert_eq!(replaced_before(&h, 150), vec![1]);
        assert_eq!(
            replaced_before(&h, 100),
            Vec::<i64>::new(),
            "strictly before"
        );
        assert_eq!(
            replaced_before(&h, 1_000),
            vec![1, 2],
            "the current one stays"
        );
        // A current snapshot created long ago: its predecessor was current until now.
        let h = log(&[(1, 10), (2, 20)]);
        assert_eq!(replaced_before(&h, 15), Vec::<i64>::new());
        assert!(replaced_before(&log(&[(1, 10)]), 1_000).is_empty());
    }

    /// A row of source s1 at an early position.
    const AT: (&str, Pos) = ("s1", (saiki_core::Lsn(1), 0));

    fn cells(t: &ChangeTable) -> Vec<Vec<(usize, columns::Cell)>> {
        t.rows.iter().map(|r| r.cells.clone()).collect()
    }

    fn row(cells: Vec<(usize, columns::Cell)>) -> Row {
        Row {
            action: 'I',
            source: "s1".into(),
            commit_lsn: 1,
            seq: 0,
            commit_ts: None,
            unchanged: None,
            cells,
        }
    }

    #[test]
    fn a_renamed_column_is_the_same_column_for_a_source_that_has_not_renamed_it_yet() {
        use saiki_core::ddl::Change;
        use saiki_core::Lsn;
        let mut t = ChangeTable::new("saiki", "items_changes");
        let (note, _, _) = t.column("note", AT, || Some("text"));
        let rename = vec![Change::RenameColumn {
            from: "note".into(),
            to: "remark".into(),
        }];
        assert!(t.schema_change("s1", (Lsn(0x100), 2), rename.clone()));
        assert!(
            !t.schema_change("s1", (Lsn(0x100), 2), rename.clone()),
            "taken once"
        );
        assert_eq!(t.column("remark", ("s1", (Lsn(0x101), 0)), || None).0, note);
        // Source s2 migrates later: its rows still say note, which is the renamed column.
        assert_eq!(t.column("note", ("s2", (Lsn(0x500), 0)), || None).0, note);
        // s1 renamed at 0x100: its rows before that say note and mean it too.
        assert_eq!(t.column("note", ("s1", (Lsn(0x99), 0)), || None).0, note);
        assert!(t.schema_change("s2", (Lsn(0x600), 1), rename));
        // After its own rename, a source naming note again means a new column.
        let (new, _, _) = t.column("note", ("s2", (Lsn(0x601), 0)), || Some("text"));
        assert_ne!(new, note);
        assert_eq!(
            t.renames_to_commit(&HashSet::new()),
            vec![("note".to_string(), "remark".to_string())]
        );
        assert_eq!(t.logged.len(), 2);
    }

    #[test]
    fn a_rename_another_relay_committed_first_moves_this_rounds_cells_under_the_new_name() {
        use columns::Cell;
        use saiki_core::ddl::Change;
        use saiki_core::Lsn;
        let mut t = ChangeTable::new("saiki", "orders_changes");
        let (article, _, _) = t.column("article", AT, || Some("text"));
        t.rows.push(row(vec![(article, Cell::Str("a".into()))]));
        // The table as the other relay left it: the field renamed, the record in its log.
        let followed = vec![LoggedChange {
            source: "s1".into(),
            lsn: Lsn(0x100),
            seq: 1,
            changes: vec![Change::RenameColumn {
                from: "article".into(),
                to: "item".into(),
            }],
        }];
        t.follow(followed.clone());
        assert_eq!(t.columns, vec![("item".to_string(), PrimitiveType::String)]);
        assert_eq!(cells(&t), vec![vec![(article, Cell::Str("a".into()))]]);
        let iceberg = Schema::builder()
            .with_fields(vec![Arc::new(NestedField::optional(
                8,
                "item",
                Type::Primitive(PrimitiveType::String),
            ))])
            .build()
            .unwrap();
        assert_eq!(
            schema::evolve(
                &iceberg,
                8,
                &t.columns,
                &t.renames_to_commit(&HashSet::new())
            )
            .unwrap(),
            None,
            "no second column under the old name"
        );
        // The record read later in this relay's own partition is followed already.
        assert!(!t.schema_change("s1", (Lsn(0x100), 1), followed[0].changes.clone()));
    }

    #[test]
    fn a_swap_of_two_names_the_table_has_followed_already_is_not_applied_again() {
        use columns::Cell;
        use saiki_core::ddl::Change;
        use saiki_core::Lsn;
        let rename = |from: &str, to: &str| Change::RenameColumn {
            from: from.into(),
            to: to.into(),
        };
        let swap: Vec<LoggedChange> = [("a", "tmp"), ("b", "a"), ("tmp", "b")]
            .iter()
            .enumerate()
            .map(|(i, (f, to))| LoggedChange {
                source: "s1".into(),
                lsn: Lsn(0x100),
                seq: i as i64,
                changes: vec![rename(f, to)],
            })
            .collect();
        // This relay took the swap itself, and another relay committed it first.
        let mut t = ChangeTable::new("saiki", "t_changes");
        let (a, _, _) = t.column("a", AT, || Some("text"));
        let (b, _, _) = t.column("b", AT, || Some("text"));
        t.rows.push(row(vec![
            (a, Cell::Str("was a".into())),
            (b, Cell::Str("was b".into())),
        ]));
        for l in &swap {
            assert!(t.schema_change(&l.source, (l.lsn, l.seq), l.changes.clone()));
        }
        let keys: HashSet<RecordKey> = swap
            .iter()
            .map(|l| (l.source.clone(), l.lsn, l.seq))
            .collect();
        t.follow(swap.clone());
        assert!(t.renames_to_commit(&keys).is_empty());
        // The Iceberg table as the other relay left it: field 8 (was a) is b, 9 is a.
        let iceberg = Schema::builder()
            .with_fields(vec![
                Arc::new(NestedField::optional(
                    8,
                    "b",
                    Type::Primitive(PrimitiveType::String),
                )),
                Arc::new(NestedField::optional(
                    9,
                    "a",
                    Type::Primitive(PrimitiveType::String),
                )),
            ])
            .build()
            .unwrap();
        assert_eq!(
            schema::evolve(&iceberg, 9, &t.columns, &t.renames_to_commit(&keys)).unwrap(),
            None
        );
        // The round's values stay with their fields: "was a" under b (field 8).
        assert_eq!(t.columns[a].0, "b");
        assert_eq!(t.columns[b].0, "a");
        // A relay that only follows (it never read the records) gets the same names.
        let mut u = ChangeTable::new("saiki", "t_changes");
        u.column("a", AT, || Some("text"));
        u.column("b", AT, || Some("text"));
        u.follow(swap);
        assert_eq!(u.columns, t.columns);
        assert!(u.renames.is_empty() && u.logged.is_empty());
    }

    #[test]
    fn a_type_change_iceberg_can_widen_converts_the_rounds_values_and_another_does_not() {
        use columns::Cell;
        use saiki_core::ddl::Change;
        use saiki_core::Lsn;
        let alter = |c: &str, to: &str| {
            vec![Change::AlterType {
                column: c.into(),
                from: String::new(),
                to: to.into(),
            }]
        };
        let mut t = ChangeTable::new("saiki", "items_changes");
        let (n, _, _) = t.column("n", AT, || Some("integer"));
        let (price, _, _) = t.column("price", AT, || Some("numeric(10,2)"));
        t.rows
            .push(row(vec![(n, Cell::Int(7)), (price, Cell::Decimal(150))]));
        assert!(t.schema_change("s1", (Lsn(0x100), 1), alter("n", "bigint")));
        assert!(t.schema_change("s1", (Lsn(0x100), 2), alter("price", "text")));
        assert_eq!(t.column("n", AT, || None).1, &PrimitiveType::Long);
        assert_eq!(
            t.column("price", AT, || None).1,
            &PrimitiveType::Decimal {
                precision: 10,
                scale: 2
            },
            "decimal → string is no Iceberg promotion"
        );
        assert_eq!(
            cells(&t),
            vec![vec![(n, Cell::Long(7)), (price, Cell::Decimal(150))]]
        );
    }

    #[test]
    fn a_json_column_is_known_as_such_once_a_record_names_its_type_and_keeps_it_by_name() {
        let mut t = ChangeTable::new("saiki", "t_changes");
        assert!(!t.column("doc", AT, || None).2, "no types: not known");
        assert!(
            t.column("doc", AT, || Some("jsonb")).2,
            "learned from the next record"
        );
        assert!(t.column("doc", AT, || panic!("asked once")).2);
        assert!(!t.column("name", AT, || Some("text")).2);
        // The table's order differs (another relay added a column first): flags follow names.
        t.set_columns(vec![
            ("other".into(), PrimitiveType::Int),
            ("name".into(), PrimitiveType::String),
            ("doc".into(), PrimitiveType::String),
        ]);
        assert!(t.column("doc", AT, || panic!("known")).2);
        assert!(!t.column("name", AT, || panic!("known")).2);
        assert!(!t.column("other", AT, || Some("integer")).2);
    }

    #[test]
    fn the_schema_puts_the_saiki_columns_first_with_unique_ids() {
        let mut t = ChangeTable::new("saiki", "orders_changes");
        t.column("id", AT, || Some("bigint"));
        t.column("price", AT, || Some("numeric(10,2)"));
        let s = t.schema().unwrap();
        let names: Vec<_> = s
            .as_struct()
            .fields()
            .iter()
            .map(|f| f.name.clone())
            .collect();
        assert_eq!(
            names,
            [
                "_saiki_action",
                "_saiki_source",
                "_saiki_commit_lsn",
                "_saiki_seq",
                "_saiki_commit_ts",
                "_saiki_unchanged",
                "id",
                "price"
            ]
        );
        assert_eq!(s.field_by_name("_saiki_commit_ts").unwrap().id, 5);
    }
}
