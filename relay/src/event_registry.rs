//! The event API's registry (`ingest.dsn`, `saiki_ingest`) as its readers see it, the sink and
//! the lake: for each event type and schema version they meet, the table its events go to
//! ([`crate::event_table::layout`]). Read once per version, before the first event of it is
//! planned or written; after that the layouts are only looked up.

use std::sync::Arc;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tracing::info;

use crate::error::RelayError;
use crate::event_table;
use crate::event_table::EventTables;

const SELECT_VERSION: &str = "SELECT s.schema::text, t.key
 FROM saiki_ingest.schemas s JOIN saiki_ingest.event_types t ON t.name = s.event_type
 WHERE s.event_type = $1 AND s.version = $2";

pub(crate) struct EventCatalog {
    dsn: String,
    /// Who reads the registry (`saiki-relay sink`), and the key that turns events off
    /// (`sink.events`), for the messages.
    reader: &'static str,
    switch: &'static str,
    client: Option<(Client, String)>,
    tables: Arc<EventTables>,
}

impl EventCatalog {
    pub(crate) fn new(dsn: String, reader: &'static str, switch: &'static str) -> Self {
        EventCatalog {
            dsn,
            reader,
            switch,
            client: None,
            tables: Arc::default(),
        }
    }

    /// The layouts known so far, for the planner.
    pub(crate) fn tables(&self) -> Arc<EventTables> {
        self.tables.clone()
    }

    /// Makes the layout of `event_type` at `version` known, reading the registry if needed.
    /// A registry that cannot be reached is a transient error (the session retries); a
    /// version the registry does not have, or that the ODS cannot hold, is remembered with
    /// the reason its events are dead-lettered.
    pub(crate) async fn learn(&mut self, event_type: &str, version: i32) -> Result<(), RelayError> {
        let id = (event_type.to_string(), version);
        if self.tables.contains_key(&id) {
            return Ok(());
        }
        if self.client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            self.client = Some(
                crate::pg::client::connect(
                    &self.dsn,
                    "the event registry",
                    "ingest.dsn",
                    self.reader,
                )
                .await?,
            );
        }
        let Some((client, target)) = &self.client else {
            return Err(RelayError::Internal("registry client vanished".into()));
        };
        let entry = match client.query_opt(SELECT_VERSION, &[&event_type, &version]).await {
            Ok(Some(row)) => {
                let schema: String = row.get(0);
                let key: Option<Vec<String>> = row.get(1);
                serde_json::from_str(&schema)
                    .map_err(|e| format!("the registry's schema of {event_type} v{version} is not JSON: {e}"))
                    .and_then(|s| event_table::layout(event_type, &s, key.as_deref()))
                    .map(Arc::new)
                    .map_err(|e| format!("event type {event_type} v{version} cannot be an ODS table: {e}"))
            }
            Ok(None) => Err(format!(
                "event type {event_type} has no schema version {version} in the event API's registry ({target}): register it, or set {} = false", self.switch
            )),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Err(format!(
                "the database of ingest.dsn ({target}) has no event registry (schema saiki_ingest): point ingest.dsn at the event API's database, or set {} = false", self.switch
            )),
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                return Err(RelayError::Ods {
                    target: target.clone(),
                    code: Some("42501".into()),
                    message: format!("reading the event registry: {e}: grant the role of {} SELECT on saiki_ingest.event_types and saiki_ingest.schemas", self.reader),
                })
            }
            Err(e) => {
                let err = crate::pg::client::pg_error(target, &e);
                self.client = None;
                return Err(err);
            }
        };
        match &entry {
            Ok(t) => info!(event_type, version, table = %t.table, "event type materialized"),
            Err(reason) => {
                tracing::warn!(event_type, version, %reason, "event type not materialized: its events go to the dead-letter topic")
            }
        }
        Arc::make_mut(&mut self.tables).insert(id, entry);
        Ok(())
    }
}
