//! The event-type registry in PostgreSQL (schema `saiki_ingest`, created on first start):
//! event types, every version of their schemas, and the hashes of the API's tokens. Answers
//! are cached for `ingest.registry_cache`, so that publishing costs no database round trip;
//! a change made through another ingest relay is seen after at most that long.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{Mutex, RwLock};
use tokio_postgres::Client;

use crate::error::RelayError;
use crate::ingest::auth::Scopes;
use crate::ingest::compat::Compatibility;

const BOOTSTRAP: &str = "
CREATE SCHEMA IF NOT EXISTS saiki_ingest;
CREATE TABLE IF NOT EXISTS saiki_ingest.event_types (
    name text PRIMARY KEY,
    owning_team text NOT NULL,
    partition_key text[] NOT NULL DEFAULT '{}',
    key text[],
    compatibility text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS saiki_ingest.schemas (
    event_type text NOT NULL REFERENCES saiki_ingest.event_types (name),
    version int NOT NULL,
    schema json NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_type, version));
CREATE TABLE IF NOT EXISTS saiki_ingest.tokens (
    hash text PRIMARY KEY,
    scopes text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());
COMMENT ON TABLE saiki_ingest.event_types IS 'saiki-relay ingest: the event types of the event API';
COMMENT ON TABLE saiki_ingest.schemas IS 'saiki-relay ingest: every JSON Schema version of every event type';
COMMENT ON TABLE saiki_ingest.tokens IS 'saiki-relay ingest: SHA-256 hashes of the API tokens and their scopes';
DO $$ BEGIN
  -- json, not jsonb: a schema keeps its properties' order (the ODS table's column order).
  -- Registries made before stored jsonb.
  IF (SELECT atttypid = 'jsonb'::regtype FROM pg_attribute
      WHERE attrelid = 'saiki_ingest.schemas'::regclass AND attname = 'schema') THEN
    ALTER TABLE saiki_ingest.schemas ALTER COLUMN schema TYPE json USING schema::json;
  END IF;
  -- The sink reads event types and schemas (never tokens) to materialize events: through
  -- this role when the DBA made it (docker/ods/initdb-ods.sh, docs/ingest.md).
  IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'saiki_registry_reader') THEN
    GRANT USAGE ON SCHEMA saiki_ingest TO saiki_registry_reader;
    GRANT SELECT ON saiki_ingest.event_types, saiki_ingest.schemas TO saiki_registry_reader;
  END IF;
END $$;
";

/// An event type at its current schema version.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct EventType {
    pub(crate) name: String,
    pub(crate) owning_team: String,
    pub(crate) schema: Value,
    pub(crate) schema_version: i32,
    pub(crate) partition_key: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<Vec<String>>,
    pub(crate) compatibility: Compatibility,
    pub(crate) created_at: String,
    pub(crate) updated_at: String,
}

/// An event type with its compiled validator.
pub(crate) struct Compiled {
    pub(crate) event_type: EventType,
    pub(crate) validator: jsonschema::Validator,
}

/// Compiles a schema (formats checked, as an event API's users expect of `date-time` or
/// `uuid`); the error says what is wrong with it.
pub(crate) fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| format!("not a valid JSON Schema: {e}"))
}

/// How a registry write ended short of a database failure.
#[derive(Debug)]
pub(crate) enum Refused {
    Exists,
    Missing,
}

/// Answers by name, with when they were read (`None`: known not to exist).
type Cache<T> = Mutex<HashMap<String, (Instant, Option<T>)>>;

pub(crate) struct Registry {
    client: RwLock<Client>,
    dsn: String,
    ttl: Duration,
    types: Cache<Arc<Compiled>>,
    tokens: Cache<Scopes>,
}

const SELECT_TYPE: &str = "SELECT t.name, t.owning_team, s.schema::text, s.version, t.partition_key, t.key, t.compatibility,
        to_char(t.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
        to_char(t.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
 FROM saiki_ingest.event_types t
 JOIN LATERAL (SELECT schema, version FROM saiki_ingest.schemas s WHERE s.event_type = t.name ORDER BY version DESC LIMIT 1) s ON true";

fn event_type(r: &tokio_postgres::Row) -> Result<EventType, RelayError> {
    let schema: String = r.get(2);
    let compatibility: String = r.get(6);
    Ok(EventType {
        name: r.get(0),
        owning_team: r.get(1),
        schema: serde_json::from_str(&schema)
            .map_err(|e| RelayError::Internal(format!("a stored schema is not JSON: {e}")))?,
        schema_version: r.get(3),
        partition_key: r.get(4),
        key: r.get(5),
        compatibility: Compatibility::parse(&compatibility).ok_or_else(|| {
            RelayError::Internal(format!("stored compatibility {compatibility:?}"))
        })?,
        created_at: r.get(7),
        updated_at: r.get(8),
    })
}

impl Registry {
    /// Connects and creates the registry's tables if missing.
    pub(crate) async fn connect(dsn: &str, ttl: Duration) -> Result<Registry, RelayError> {
        let (client, _) = crate::pg::client::connect(
            dsn,
            "the ingest registry",
            "ingest.dsn",
            "saiki-relay ingest",
        )
        .await?;
        client
            .batch_execute(BOOTSTRAP)
            .await
            .map_err(|e| crate::pg::client::pg_error("the ingest registry (ingest.dsn)", &e))?;
        Ok(Registry {
            client: RwLock::new(client),
            dsn: dsn.to_string(),
            ttl,
            types: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The client, connected again if the connection was lost.
    async fn client(&self) -> Result<tokio::sync::RwLockReadGuard<'_, Client>, RelayError> {
        if self.client.read().await.is_closed() {
            let (c, _) = crate::pg::client::connect(
                &self.dsn,
                "the ingest registry",
                "ingest.dsn",
                "saiki-relay ingest",
            )
            .await?;
            *self.client.write().await = c;
        }
        Ok(self.client.read().await)
    }

    fn err(e: &tokio_postgres::Error) -> RelayError {
        crate::pg::client::pg_error("the ingest registry (ingest.dsn)", e)
    }

    /// Every event type at its current version.
    pub(crate) async fn list(&self) -> Result<Vec<EventType>, RelayError> {
        let c = self.client().await?;
        let rows = c
            .query(&format!("{SELECT_TYPE} ORDER BY t.name"), &[])
            .await
            .map_err(|e| Self::err(&e))?;
        rows.iter().map(event_type).collect()
    }

    /// An event type with its validator (cached).
    pub(crate) async fn get(&self, name: &str) -> Result<Option<Arc<Compiled>>, RelayError> {
        if let Some((at, c)) = self.types.lock().await.get(name) {
            if at.elapsed() < self.ttl {
                return Ok(c.clone());
            }
        }
        let c = self.client().await?;
        let row = c
            .query_opt(&format!("{SELECT_TYPE} WHERE t.name = $1"), &[&name])
            .await
            .map_err(|e| Self::err(&e))?;
        drop(c);
        let compiled = match row {
            None => None,
            Some(r) => {
                let event_type = event_type(&r)?;
                let validator = compile(&event_type.schema).map_err(|e| {
                    RelayError::Internal(format!("the stored schema of {name}: {e}"))
                })?;
                Some(Arc::new(Compiled {
                    event_type,
                    validator,
                }))
            }
        };
        self.types
            .lock()
            .await
            .insert(name.to_string(), (Instant::now(), compiled.clone()));
        Ok(compiled)
    }

    /// Registers a new event type at schema version 1.
    pub(crate) async fn create(&self, t: &EventType) -> Result<Result<(), Refused>, RelayError> {
        let mut c = self.client.write().await;
        let tx = c.transaction().await.map_err(|e| Self::err(&e))?;
        let n = tx
            .execute(
                "INSERT INTO saiki_ingest.event_types (name, owning_team, partition_key, key, compatibility)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
                &[&t.name, &t.owning_team, &t.partition_key, &t.key, &t.compatibility.as_str()],
            )
            .await
            .map_err(|e| Self::err(&e))?;
        if n == 0 {
            return Ok(Err(Refused::Exists));
        }
        tx.execute(
            "INSERT INTO saiki_ingest.schemas (event_type, version, schema) VALUES ($1, 1, $2::text::json)",
            &[&t.name, &t.schema.to_string()],
        )
        .await
        .map_err(|e| Self::err(&e))?;
        tx.commit().await.map_err(|e| Self::err(&e))?;
        self.types.lock().await.remove(&t.name);
        Ok(Ok(()))
    }

    /// Stores the next schema version of an event type (compatibility is the caller's check)
    /// and its other fields. Returns the new version.
    pub(crate) async fn update(
        &self,
        t: &EventType,
        previous_version: i32,
    ) -> Result<Result<i32, Refused>, RelayError> {
        let mut c = self.client.write().await;
        let tx = c.transaction().await.map_err(|e| Self::err(&e))?;
        let n = tx
            .execute(
                "UPDATE saiki_ingest.event_types SET owning_team = $2, partition_key = $3, key = $4, compatibility = $5, updated_at = now() WHERE name = $1",
                &[&t.name, &t.owning_team, &t.partition_key, &t.key, &t.compatibility.as_str()],
            )
            .await
            .map_err(|e| Self::err(&e))?;
        if n == 0 {
            return Ok(Err(Refused::Missing));
        }
        let version = previous_version + 1;
        // The primary key refuses a version taken meanwhile by another writer: the caller
        // answers 409 and the client reads the type again.
        let stored = tx
            .execute(
                "INSERT INTO saiki_ingest.schemas (event_type, version, schema) VALUES ($1, $2, $3::text::json) ON CONFLICT DO NOTHING",
                &[&t.name, &version, &t.schema.to_string()],
            )
            .await
            .map_err(|e| Self::err(&e))?;
        if stored == 0 {
            return Ok(Err(Refused::Exists));
        }
        tx.commit().await.map_err(|e| Self::err(&e))?;
        self.types.lock().await.remove(&t.name);
        Ok(Ok(version))
    }

    /// The scopes of a stored token (by hash), cached.
    pub(crate) async fn scopes(&self, hash: &str) -> Result<Option<Scopes>, RelayError> {
        if let Some((at, s)) = self.tokens.lock().await.get(hash) {
            if at.elapsed() < self.ttl {
                return Ok(s.clone());
            }
        }
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT scopes FROM saiki_ingest.tokens WHERE hash = $1",
                &[&hash],
            )
            .await
            .map_err(|e| Self::err(&e))?;
        let scopes = row.map(|r| Scopes(r.get(0)));
        self.tokens
            .lock()
            .await
            .insert(hash.to_string(), (Instant::now(), scopes.clone()));
        Ok(scopes)
    }

    /// Stores a token's hash and scopes.
    pub(crate) async fn add_token(&self, hash: &str, scopes: &Scopes) -> Result<(), RelayError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO saiki_ingest.tokens (hash, scopes) VALUES ($1, $2)",
            &[&hash, &scopes.0],
        )
        .await
        .map_err(|e| Self::err(&e))?;
        Ok(())
    }
}
