//! `LakeEngine`: the lake's write path without Kafka, for bench/lake's engine-only figure
//! (records from memory into an Iceberg change-log table, against a reference writer doing
//! the same from memory). It is the relay's own code, not a copy: `Round` turns records into
//! rows and admits them through the ledger, and `Catalog::commit` writes the Parquet files
//! through iceberg's writers and commits each table with its marks.

use saiki_core::view::{Fields, RecordView};

use super::round::Round;
use super::table::Catalog;
use super::{tables_of, LakeRuntime};
use crate::config::Config;

pub struct LakeEngine {
    rt: LakeRuntime,
    catalog: Catalog,
    round: Round,
}

impl LakeEngine {
    /// Opens the catalog and the warehouse of `config`, a configuration file's text with a
    /// `[lake]` section (and `[kafka]`'s `topic_prefix` for the table names).
    pub async fn open(config: &str) -> Result<LakeEngine, String> {
        let cfg: Config = toml::from_str(config).map_err(|e| e.to_string())?;
        let lake = cfg
            .lake
            .clone()
            .ok_or("the configuration has no [lake] section")?;
        let rt =
            LakeRuntime::new(lake, cfg.kafka.clone(), None, None).map_err(|e| e.to_string())?;
        let catalog = Catalog::open(&rt).await.map_err(|e| e.to_string())?;
        Ok(LakeEngine {
            rt,
            catalog,
            round: Round::default(),
        })
    }

    /// One message of partition 0 of `topic` into the round, as the relay takes a record
    /// outside a streamed transaction (the engine does not hold streamed records, and a
    /// record it cannot write is an error, not a dead letter).
    pub async fn write(&mut self, topic: &str, offset: i64, payload: &[u8]) -> Result<(), String> {
        let tp = (topic.to_string(), 0);
        if !self.round.ledger.take(&tp, offset) {
            return Ok(());
        }
        let rec: RecordView<'_, Fields<'_>> =
            RecordView::parse(payload).map_err(|e| format!("not a change record: {e}"))?;
        let names = tables_of(&rec)?;
        self.round
            .prepare(&self.catalog, &self.rt.lake.namespace, &names)
            .await
            .map_err(|e| e.to_string())?;
        self.round.write(&tp, &rec, payload, &names, offset, None)
    }

    /// Whether the round has reached `lake.target_file_size`, where the relay ends one.
    pub fn round_full(&self) -> bool {
        self.round.bytes >= self.rt.lake.target_file_size
    }

    /// Commits the round, as the relay does at its end; returns the data files written.
    pub async fn commit(&mut self) -> Result<usize, String> {
        let mut files = 0;
        self.round
            .commit(
                &self.catalog,
                self.rt.lake.target_file_size,
                self.rt.lake.snapshot_retention,
                |c| files += c.files,
            )
            .await
            .map_err(|e| e.to_string())?;
        self.round.rows = 0;
        self.round.bytes = 0;
        Ok(files)
    }
}
