//! The lake's Iceberg I/O: the SQL catalog, a change-log table's columns as the lake knows
//! them, and one commit of a round's rows (Parquet files through iceberg's writers, a fast
//! append whose snapshot summary holds the table's marks).

use std::collections::HashMap;
use std::sync::Arc;

use iceberg::arrow::{schema_to_arrow_schema, RecordBatchPartitionSplitter};
use iceberg::io::LocalFsStorageFactory;
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
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use tracing::info;

use super::columns::{self, Row};
use super::ledger::{decode_marks, encode_marks, Ledger, Marks, SUMMARY_KEY};
use super::LakeRuntime;
use crate::error::RelayError;
use crate::pg::dsn::Dsn;

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

/// The catalog database as sqlx's URL.
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
    Ok(if d.host.starts_with('/') {
        format!(
            "postgres://{auth}@localhost:{}/{}?host={}",
            d.port,
            enc(&d.dbname),
            enc(&d.host)
        )
    } else {
        format!("postgres://{auth}@{}:{}/{}", d.host, d.port, enc(&d.dbname))
    })
}

/// `lake.warehouse` as a `file://` URL of an absolute folder.
pub(crate) fn warehouse_url(w: &str) -> Result<String, RelayError> {
    let path = w.strip_prefix("file://").unwrap_or(w);
    if w.starts_with("s3://") || w.contains("://") && !w.starts_with("file://") {
        return Err(RelayError::Config(format!(
            "lake.warehouse = {w:?}: only a local folder (file:///path) is built so far; object storage (s3://) is not (docs/lake.md)"
        )));
    }
    if !path.starts_with('/') {
        return Err(RelayError::Config(format!(
            "lake.warehouse = {w:?}: give an absolute folder (file:///var/lib/saiki/lake)"
        )));
    }
    Ok(format!("file://{}", path.trim_end_matches('/')))
}

/// A change-log table as the lake knows it: its columns after the `_saiki_*` ones, in the
/// table's order, and how many of them the Iceberg table has (the rest are added at the
/// next commit). The rows of the round in hand.
pub(crate) struct ChangeTable {
    ident: TableIdent,
    columns: Vec<(String, PrimitiveType)>,
    /// Name → index into `columns` (kept by `set_columns` and `column`).
    index: HashMap<String, usize>,
    in_iceberg: Option<usize>,
    pub(crate) rows: Vec<Row>,
}

impl ChangeTable {
    pub(crate) fn new(namespace: &str, name: &str) -> Self {
        ChangeTable {
            ident: TableIdent::new(NamespaceIdent::new(namespace.to_string()), name.to_string()),
            columns: Vec::new(),
            index: HashMap::new(),
            in_iceberg: None,
            rows: Vec::new(),
        }
    }

    /// The index and type of a column; the first time the column is met, its type is
    /// learned from the record's (`pg`, asked only then; text if it has none).
    pub(crate) fn column<'p>(
        &mut self,
        name: &str,
        pg: impl FnOnce() -> Option<&'p str>,
    ) -> (usize, &PrimitiveType) {
        let i = match self.index.get(name) {
            Some(i) => *i,
            None => {
                let ty = pg().map_or(PrimitiveType::String, columns::iceberg_type);
                self.columns.push((name.to_string(), ty));
                self.index.insert(name.to_string(), self.columns.len() - 1);
                self.columns.len() - 1
            }
        };
        (i, &self.columns[i].1)
    }

    fn set_columns(&mut self, cols: Vec<(String, PrimitiveType)>) {
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
}

impl Catalog {
    /// Opens the SQL catalog (creating its tables and the namespace if missing) and checks
    /// that the warehouse folder can be written.
    pub(crate) async fn open(rt: &LakeRuntime) -> Result<Catalog, RelayError> {
        let folder = rt.warehouse.trim_start_matches("file://").to_string();
        check_writable(&folder)?;
        let catalog = SqlCatalogBuilder::default()
            .uri(rt.catalog_url.clone())
            .warehouse_location(rt.warehouse.clone())
            .sql_bind_style(SqlBindStyle::DollarNumeric)
            .with_storage_factory(Arc::new(LocalFsStorageFactory))
            // The lake commits one table at a time: two connections are plenty, and the
            // catalog database is often the ODS.
            .load(
                rt.lake.catalog_name.clone(),
                HashMap::from([("pool.max-connections".to_string(), "2".to_string())]),
            )
            .await
            .map_err(|e| lake_err("opening the SQL catalog (lake.catalog_dsn)", e))?;
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
        Ok(Catalog { catalog, namespace })
    }

    /// The table and its marks as its current snapshot has them, or `None` if it does not
    /// exist yet.
    pub(crate) async fn load(
        &self,
        name: &str,
    ) -> Result<Option<(ChangeTable, Marks)>, RelayError> {
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
        t.in_iceberg = Some(t.columns.len());
        Ok(Some((t, current_marks(&table)?)))
    }

    /// Writes the table's rows of the round and commits them with the table's marks.
    /// Returns the number of data files.
    pub(crate) async fn commit(
        &self,
        t: &mut ChangeTable,
        ledger: &mut Ledger,
        target_file_size: usize,
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
            match tx.commit(&self.catalog).await {
                Ok(_) => {
                    ledger.committed(&name);
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

    /// The Iceberg table, created (partitioned by day of `_saiki_commit_ts`) or evolved
    /// (columns added) to hold every column the lake knows.
    async fn ensure(&self, t: &mut ChangeTable) -> Result<iceberg::table::Table, RelayError> {
        let Some(have) = t.in_iceberg else {
            let schema = t.schema().map_err(|e| lake_err("schema", e))?;
            let spec = UnboundPartitionSpec::builder()
                .add_partition_field(5, format!("{}_day", columns::COMMIT_TS), Transform::Day)
                .map_err(|e| lake_err("partition spec", e))?
                .build();
            let creation = TableCreation::builder()
                .name(t.ident.name().to_string())
                .schema(schema)
                .partition_spec(spec)
                .properties(HashMap::from([
                    ("write.format.default".to_string(), "parquet".to_string()),
                    // Conflicts are retried here, with the marks read again (`commit`).
                    ("commit.retry.num-retries".to_string(), "0".to_string()),
                ]))
                .build();
            let table = match self.catalog.create_table(&self.namespace, creation).await {
                Ok(table) => table,
                // Another lake relay of the group created it meanwhile: evolve it instead.
                Err(e) if e.kind() == ErrorKind::TableAlreadyExists => {
                    t.in_iceberg = Some(0);
                    return Box::pin(self.ensure(t)).await;
                }
                Err(e) => return Err(lake_err(&format!("creating {}", t.ident), e)),
            };
            info!(table = %t.ident, columns = t.columns.len(), "table created");
            t.in_iceberg = Some(t.columns.len());
            return Ok(table);
        };
        let table = self
            .catalog
            .load_table(&t.ident)
            .await
            .map_err(|e| lake_err(&format!("loading {}", t.ident), e))?;
        let existing: Vec<String> = table
            .metadata()
            .current_schema()
            .as_struct()
            .fields()
            .iter()
            .map(|f| f.name.clone())
            .collect();
        let missing: Vec<&(String, PrimitiveType)> = t
            .columns
            .iter()
            .filter(|(c, _)| !existing.contains(c))
            .collect();
        if missing.is_empty() && have == t.columns.len() {
            return Ok(table);
        }
        let mut table = table;
        if !missing.is_empty() {
            let tx = Transaction::new(&table);
            let mut action = tx.update_schema();
            for (c, ty) in &missing {
                action = action.add_column(iceberg::transaction::AddColumn::optional(
                    c,
                    Type::Primitive(ty.clone()),
                ));
            }
            let tx = action.apply(tx).map_err(|e| lake_err("schema", e))?;
            table = tx
                .commit(&self.catalog)
                .await
                .map_err(|e| lake_err(&format!("adding columns to {}", t.ident), e))?;
            info!(table = %t.ident, added = missing.len(), "columns added");
        }
        // The lake's column order is the table's (a column another relay added first may
        // sit before ours): take the table's order and types.
        let ordered = columns_of(table.metadata().current_schema());
        if ordered != t.columns {
            // Cells of the round refer to the lake's old order: map them.
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
                for (i, _) in &mut r.cells {
                    *i = map[*i];
                }
            }
            t.set_columns(ordered);
        }
        t.in_iceberg = Some(t.columns.len());
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
            "postgres://postgres@127.0.0.1:5433/ods"
        );
        assert_eq!(
            catalog_url("postgres://a%20b:p%40ss@db:5432/ods").unwrap(),
            "postgres://a%20b:p%40ss@db:5432/ods"
        );
    }

    #[test]
    fn the_warehouse_is_an_absolute_folder() {
        assert_eq!(warehouse_url("/var/lake/").unwrap(), "file:///var/lake");
        assert_eq!(
            warehouse_url("file:///var/lake").unwrap(),
            "file:///var/lake"
        );
        assert!(warehouse_url("lake")
            .unwrap_err()
            .to_string()
            .contains("absolute"));
        assert!(warehouse_url("s3://b/p")
            .unwrap_err()
            .to_string()
            .contains("s3"));
    }

    #[test]
    fn the_schema_puts_the_saiki_columns_first_with_unique_ids() {
        let mut t = ChangeTable::new("saiki", "orders_changes");
        t.column("id", || Some("bigint"));
        t.column("price", || Some("numeric(10,2)"));
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
