//! `saiki-relay ingest`: the event API for services that push their events (docs/ingest.md).
//!
//! The paths and bodies follow Nakadi's publishing API where the features overlap: event
//! types with a JSON Schema (`/event-types`), batches of events (`POST
//! /event-types/{name}/events`), `metadata.eid` and `occurred_at`, per-event reports with 422.
//!
//! Invariants kept here:
//! - **200 means Kafka has every event of the batch.** The answer waits for the producer's
//!   acknowledgement of each (idempotent producer, `acks=all`); a batch Kafka does not
//!   acknowledge within `ingest.ack_timeout` is answered 503, and the client retries it.
//! - **A batch is all or nothing at validation.** One event that fails its schema or the
//!   API's checks refuses the batch with 422 (`events.rs` builds the report) and
//!   nothing of it is produced.
//! - **No write without a token.** Every request but the probes carries a bearer token whose
//!   scopes allow it (`auth.rs`); the registry stores only token hashes.
//! - **Bounded.** Bodies over `ingest.max_body_bytes` and batches over
//!   `ingest.max_batch_events` are refused with 413 before anything is parsed or produced.

pub(crate) mod auth;
pub(crate) mod compat;
pub(crate) mod dedup;
pub(crate) mod events;
pub(crate) mod registry;
pub(crate) mod tls;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{IngestConfig, KafkaConfig};
use crate::error::RelayError;
use crate::ingest::auth::{Action, Scopes};
use crate::ingest::compat::Compatibility;
use crate::ingest::registry::{EventType, Refused, Registry};
use crate::kafka::{Kafka, Outgoing};
use crate::metrics::IngestMetrics;
use crate::source::route::sanitize_topic;

/// Events handed to the producer at once, across requests (librdkafka's local queue).
const PRODUCER_QUEUE_CAPACITY: usize = 100_000;
/// Errors reported per failing event at most.
const ERRORS_PER_EVENT: usize = 10;

/// The ingest relay's settings, checked.
pub(crate) struct IngestRuntime {
    pub(crate) ingest: IngestConfig,
    pub(crate) kafka: KafkaConfig,
    /// The registry database: `ingest.dsn`, or `sink.dsn`.
    pub(crate) dsn: String,
    pub(crate) admin_token: String,
    /// HTTPS: `ingest.tls_cert` and `ingest.tls_key`, read and checked.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
}

impl IngestRuntime {
    pub(crate) fn new(
        ingest: IngestConfig,
        sink_dsn: Option<&str>,
        kafka: KafkaConfig,
    ) -> Result<Self, RelayError> {
        let Some(dsn) = ingest.dsn.clone().or(sink_dsn.map(str::to_string)) else {
            return Err(RelayError::Config(
                "ingest needs its registry database: ingest.dsn (SAIKI_INGEST_DSN, --dsn), or sink.dsn to use the ODS".into(),
            ));
        };
        let admin_token = ingest.admin_token.clone().unwrap_or_default();
        if admin_token.trim().len() < 16 {
            return Err(RelayError::Config(
                "ingest.admin_token must be at least 16 characters: set a long random secret (SAIKI_INGEST_ADMIN_TOKEN)".into(),
            ));
        }
        if ingest.max_body_bytes == 0 || ingest.max_batch_events == 0 {
            return Err(RelayError::Config(
                "ingest.max_body_bytes and ingest.max_batch_events must be at least 1".into(),
            ));
        }
        if ingest.max_in_flight_events < ingest.max_batch_events {
            return Err(RelayError::Config(
                "ingest.max_in_flight_events must be at least ingest.max_batch_events (a batch must fit)".into(),
            ));
        }
        if ingest.ack_timeout.is_zero() {
            return Err(RelayError::Config(
                "ingest.ack_timeout must be more than 0s".into(),
            ));
        }
        let tls = match (&ingest.tls_cert, &ingest.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            (None, None) => None,
            _ => return Err(RelayError::Config(
                "ingest.tls_cert and ingest.tls_key go together: set both for HTTPS, or neither"
                    .into(),
            )),
        };
        Ok(IngestRuntime {
            ingest,
            kafka,
            dsn,
            admin_token,
            tls,
        })
    }

    /// The topic of an event type: `{topic_prefix}.events.{name}`.
    pub(crate) fn topic(&self, event_type: &str) -> String {
        sanitize_topic(&format!("{}.events.{event_type}", self.kafka.topic_prefix))
    }
}

struct App {
    rt: Arc<IngestRuntime>,
    registry: Registry,
    kafka: Kafka,
    metrics: Arc<IngestMetrics>,
    /// One permit per event handed to Kafka and not yet acknowledged.
    in_flight: Arc<tokio::sync::Semaphore>,
    recent: std::sync::Mutex<dedup::Recent>,
}

/// Serves the event API until `shutdown` turns true, then finishes the requests in flight
/// (up to `ingest.shutdown_grace`) and returns.
pub(crate) async fn run(
    rt: Arc<IngestRuntime>,
    metrics: Arc<IngestMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let registry = Registry::connect(&rt.dsn, rt.ingest.registry_cache).await?;
    let kafka = Kafka::new(&rt.kafka, PRODUCER_QUEUE_CAPACITY)?;
    let listener = tokio::net::TcpListener::bind(&rt.ingest.listen)
        .await
        .map_err(|e| {
            RelayError::Config(format!("ingest.listen = \"{}\": {e}", rt.ingest.listen))
        })?;
    let window = Arc::new(tokio::sync::Semaphore::new(rt.ingest.max_in_flight_events));
    let _ = metrics
        .window
        .set((window.clone(), rt.ingest.max_in_flight_events));
    let app = Arc::new(App {
        rt: rt.clone(),
        registry,
        kafka,
        metrics: metrics.clone(),
        in_flight: window.clone(),
        recent: std::sync::Mutex::new(dedup::Recent::new(
            rt.ingest.dedup_window,
            rt.ingest.dedup_capacity,
        )),
    });
    let router = Router::new()
        .route("/event-types", get(list_types).post(create_type))
        .route("/event-types/{name}", get(get_type).put(update_type))
        .route("/event-types/{name}/events", post(publish))
        .route("/tokens", post(create_token))
        .route("/openapi.json", get(openapi))
        .fallback(|| async {
            problem(
                StatusCode::NOT_FOUND,
                "no such resource: see /openapi.json or docs/ingest.md (/event-types, /event-types/{name}/events, /tokens)",
            )
        })
        .layer(DefaultBodyLimit::max(rt.ingest.max_body_bytes))
        .with_state(app);
    info!(listen = %rt.ingest.listen, tls = rt.tls.is_some(), "event API listening");
    metrics.ready.store(true, Ordering::Relaxed);
    let grace = rt.ingest.shutdown_grace;
    let mut stop = shutdown.clone();
    let stopped = async move {
        while !*stop.borrow_and_update() {
            if stop.changed().await.is_err() {
                break;
            }
        }
    };
    let server = match rt.tls.clone() {
        Some(acceptor) => {
            let listener = tls::TlsListener::new(listener, acceptor).map_err(|e| {
                RelayError::Config(format!("ingest.listen = \"{}\": {e}", rt.ingest.listen))
            })?;
            let serve = axum::serve(listener, router).with_graceful_shutdown(stopped);
            tokio::spawn(async move { serve.await })
        }
        None => {
            let serve = axum::serve(listener, router).with_graceful_shutdown(stopped);
            tokio::spawn(async move { serve.await })
        }
    };
    // Wait for the shutdown, then give the requests in flight their grace period.
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    metrics.ready.store(false, Ordering::Relaxed);
    info!(?grace, "shutdown: finishing the requests in flight");
    match tokio::time::timeout(grace, server).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(RelayError::Internal(format!(
            "the event API server failed: {e}"
        ))),
        Ok(Err(e)) => Err(RelayError::Internal(format!(
            "the event API task failed: {e}"
        ))),
        Err(_) => {
            warn!(
                ?grace,
                "requests still open after the grace period: stopped"
            );
            Ok(())
        }
    }
}

/// The API's OpenAPI document (docs/ingest-openapi.json), served as it is.
const OPENAPI: &str = include_str!("../../../docs/ingest-openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// `saiki-relay token`: stores a new token with `scopes` in the registry at `dsn` (created
/// if missing) and returns it.
pub(crate) async fn make_token(dsn: &str, scopes: &[String]) -> Result<String, RelayError> {
    if let Some(bad) = scopes.iter().find(|s| !auth::valid_scope(s)) {
        return Err(RelayError::Config(format!(
            "scope {bad:?}: use admin, read, or write:<event type>"
        )));
    }
    let registry = Registry::connect(dsn, std::time::Duration::ZERO).await?;
    issue_token(&registry, scopes).await
}

/// A new token with these (valid) scopes, its hash stored in the registry: for `POST /tokens`
/// and `saiki-relay token`.
async fn issue_token(registry: &Registry, scopes: &[String]) -> Result<String, RelayError> {
    let token = auth::new_token();
    registry
        .add_token(&auth::hash(&token), &Scopes(scopes.to_vec()))
        .await?;
    info!(scopes = ?scopes, "token created");
    Ok(token)
}

/// A refused request: its status and what to do, answered as a [`problem`].
struct Refusal {
    status: StatusCode,
    detail: String,
}

impl Refusal {
    fn new(status: StatusCode, detail: impl Into<String>) -> Refusal {
        Refusal {
            status,
            detail: detail.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        problem(self.status, self.detail)
    }
}

/// An RFC 7807 problem (`application/problem+json`), as Nakadi answers errors.
fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let mut r = (status, serde_json::to_string(body).unwrap_or_default()).into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A registry or Kafka failure: 503 when retrying can help, 500 otherwise.
fn unavailable(e: &RelayError) -> Response {
    warn!(error = %e, "request failed");
    if e.is_transient() {
        problem(StatusCode::SERVICE_UNAVAILABLE, format!("{e}: retry later"))
    } else {
        problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// Checks the bearer token against the action: the admin token of the config, or a stored
/// token's scopes. `Err` is the answer (401 or 403).
async fn authorize(app: &App, headers: &HeaderMap, action: Action<'_>) -> Result<(), Response> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(token) = auth::bearer(header) else {
        return Err(problem(
            StatusCode::UNAUTHORIZED,
            "no bearer token: send Authorization: Bearer <token>",
        ));
    };
    let scopes = if auth::same_secret(token, &app.rt.admin_token) {
        Scopes::admin()
    } else {
        match app.registry.scopes(&auth::hash(token)).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(problem(StatusCode::UNAUTHORIZED, "unknown token"));
            }
            Err(e) => return Err(unavailable(&e)),
        }
    };
    if scopes.allows(action) {
        Ok(())
    } else {
        let need = match action {
            Action::Admin => "admin".to_string(),
            Action::Read => "read".to_string(),
            Action::Write(t) => format!("write:{t}"),
        };
        Err(problem(
            StatusCode::FORBIDDEN,
            format!("this token's scopes do not allow it: it needs {need} (or admin)"),
        ))
    }
}

/// The body of `POST /event-types` and `PUT /event-types/{name}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventTypeBody {
    name: String,
    owning_team: String,
    schema: Value,
    #[serde(default)]
    partition_key: Vec<String>,
    #[serde(default)]
    key: Option<Vec<String>>,
    #[serde(default = "forward")]
    compatibility: Compatibility,
}

fn forward() -> Compatibility {
    Compatibility::Forward
}

/// Parses and checks an event type body; `Err` is the 400 or 422 answer.
fn event_type_of(body: Result<Bytes, BytesRejection>) -> Result<EventType, Refusal> {
    let body = body.map_err(|r| Refusal::new(r.status(), r.body_text()))?;
    let b: EventTypeBody = serde_json::from_slice(&body).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("not an event type: {e} (fields: name, owning_team, schema, partition_key, key, compatibility)"),
        )
    })?;
    if !events::valid_name(&b.name) {
        return Err(Refusal::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "name {:?}: use 1 to 60 letters, digits, '_', '-' or '.' (it names a Kafka topic and an ODS table)",
                b.name
            ),
        ));
    }
    if b.owning_team.trim().is_empty() {
        return Err(Refusal::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "owning_team is empty",
        ));
    }
    registry::compile(&b.schema)
        .map_err(|e| Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, format!("schema: {e}")))?;
    for p in b.partition_key.iter().chain(b.key.iter().flatten()) {
        if !p.starts_with('/') {
            return Err(Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{p:?} is not a JSON pointer: partition_key and key name fields as \"/field\" or \"/a/b\""),
            ));
        }
    }
    // The events of one key must keep their order: they share a partition when the
    // partition key is within the key (by default, it is the key).
    let key = b.key.filter(|k| !k.is_empty());
    let mut partition_key = b.partition_key;
    if let Some(k) = &key {
        if partition_key.is_empty() {
            partition_key.clone_from(k);
        } else if let Some(p) = partition_key.iter().find(|p| !k.contains(p)) {
            return Err(Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("partition_key {p:?} is not part of the key: the events of one key must share a partition to keep their order in the ODS; leave partition_key out to partition by the key"),
            ));
        }
    }
    crate::event_table::layout(&b.name, &b.schema, key.as_deref())
        .map_err(|e| Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    Ok(EventType {
        name: b.name,
        owning_team: b.owning_team,
        schema: b.schema,
        schema_version: 1,
        partition_key,
        key,
        compatibility: b.compatibility,
        created_at: String::new(),
        updated_at: String::new(),
    })
}

async fn list_types(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&app, &headers, Action::Read).await {
        return r;
    }
    match app.registry.list().await {
        Ok(types) => json_response(StatusCode::OK, &types),
        Err(e) => unavailable(&e),
    }
}

async fn get_type(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&app, &headers, Action::Read).await {
        return r;
    }
    answer_type(&app, &name, StatusCode::OK).await
}

/// Answers with the event type as the registry holds it now (404 if it does not).
async fn answer_type(app: &App, name: &str, status: StatusCode) -> Response {
    match app.registry.get(name).await {
        Ok(Some(c)) => json_response(status, &c.event_type),
        Ok(None) => problem(StatusCode::NOT_FOUND, format!("no event type {name:?}")),
        Err(e) => unavailable(&e),
    }
}

async fn create_type(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = authorize(&app, &headers, Action::Admin).await {
        return r;
    }
    let t = match event_type_of(body) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    // Two names that differ only where the ODS table name cannot (`a.b`, `a_b`, `A-b`)
    // would share a table.
    let table = crate::event_table::table_name(&t.name).unwrap_or_default();
    match app.registry.list().await {
        Ok(types) => {
            if let Some(other) = types.iter().find(|o| {
                o.name != t.name
                    && crate::event_table::table_name(&o.name).is_ok_and(|n| n == table)
            }) {
                return problem(
                    StatusCode::CONFLICT,
                    format!(
                        "event type {:?} would share the ODS table {table} with event type {:?}: choose another name",
                        t.name, other.name
                    ),
                );
            }
        }
        Err(e) => return unavailable(&e),
    }
    match app.registry.create(&t).await {
        Ok(Ok(())) => {
            info!(event_type = %t.name, team = %t.owning_team, "event type created");
            answer_type(&app, &t.name, StatusCode::CREATED).await
        }
        Ok(Err(_)) => problem(
            StatusCode::CONFLICT,
            format!(
                "event type {:?} exists: PUT /event-types/{} changes it",
                t.name, t.name
            ),
        ),
        Err(e) => unavailable(&e),
    }
}

async fn update_type(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = authorize(&app, &headers, Action::Admin).await {
        return r;
    }
    let t = match event_type_of(body) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    if t.name != name {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the body names {:?}, the path {name:?}: an event type is not renamed",
                t.name
            ),
        );
    }
    let current = match app.registry.get(&name).await {
        Ok(Some(c)) => c,
        Ok(None) => return problem(StatusCode::NOT_FOUND, format!("no event type {name:?}")),
        Err(e) => return unavailable(&e),
    };
    let old = &current.event_type;
    if (&old.key, &old.partition_key) != (&t.key, &t.partition_key) {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "partition_key and key of {name:?} cannot change (the order of each key's events and the ODS table's primary key depend on them): keep partition_key {:?} and key {:?}, or create a new event type",
                old.partition_key,
                old.key.as_deref().unwrap_or_default()
            ),
        );
    }
    // The rule of the current version decides; a looser rule applies from the next change.
    let breaks = old.compatibility.breaks(&old.schema, &t.schema);
    if !breaks.is_empty() {
        return json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({
                "type": "about:blank",
                "title": "Unprocessable Entity",
                "status": 422,
                "detail": format!("the new schema breaks the event type's compatibility ({})", old.compatibility.as_str()),
                "breaks": breaks,
            }),
        );
    }
    if old.schema == t.schema
        && (
            old.owning_team.as_str(),
            &old.partition_key,
            &old.key,
            old.compatibility,
        ) == (
            t.owning_team.as_str(),
            &t.partition_key,
            &t.key,
            t.compatibility,
        )
    {
        return json_response(StatusCode::OK, old);
    }
    match app.registry.update(&t, old.schema_version).await {
        Ok(Ok(version)) => {
            info!(event_type = %name, version, "event type changed");
            answer_type(&app, &name, StatusCode::OK).await
        }
        Ok(Err(Refused::Missing)) => {
            problem(StatusCode::NOT_FOUND, format!("no event type {name:?}"))
        }
        Ok(Err(Refused::Exists)) => problem(
            StatusCode::CONFLICT,
            "the event type changed meanwhile: GET it and try again",
        ),
        Err(e) => unavailable(&e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    scopes: Vec<String>,
}

async fn create_token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(r) = authorize(&app, &headers, Action::Admin).await {
        return r;
    }
    let body = match body {
        Ok(b) => b,
        Err(r) => return problem(r.status(), r.body_text()),
    };
    let b: TokenBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("not a token request: {e} (send {{\"scopes\": [\"write:<event type>\"]}})"),
            )
        }
    };
    if b.scopes.is_empty() || !b.scopes.iter().all(|s| auth::valid_scope(s)) {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "scopes: one or more of \"admin\", \"read\", \"write:<event type>\"",
        );
    }
    match issue_token(&app.registry, &b.scopes).await {
        Ok(token) => json_response(
            StatusCode::CREATED,
            &json!({"token": token, "scopes": b.scopes}),
        ),
        Err(e) => unavailable(&e),
    }
}

async fn publish(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let received = Instant::now();
    let flow_id = headers
        .get("x-flow-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut response = publish_batch(&app, &name, &headers, body, &flow_id).await;
    app.metrics
        .publish
        .observe(received.elapsed().as_secs_f64());
    app.metrics.answered(response.status().as_u16());
    if let Ok(v) = HeaderValue::from_str(&flow_id) {
        response.headers_mut().insert("x-flow-id", v);
    }
    response
}

async fn publish_batch(
    app: &App,
    name: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    flow_id: &str,
) -> Response {
    if let Err(r) = authorize(app, headers, Action::Write(name)).await {
        return r;
    }
    let body = match body {
        Ok(b) => b,
        Err(r) => {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                app.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                return problem(
                    r.status(),
                    format!(
                        "the body is larger than ingest.max_body_bytes ({} bytes): send smaller batches",
                        app.rt.ingest.max_body_bytes
                    ),
                );
            }
            return problem(r.status(), r.body_text());
        }
    };
    let compiled = match app.registry.get(name).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                format!("no event type {name:?}: create it with POST /event-types"),
            )
        }
        Err(e) => return unavailable(&e),
    };
    let mut batch: Vec<Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(a)) => a,
        Ok(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "the body is a JSON array of events",
            )
        }
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            )
        }
    };
    if batch.len() > app.rt.ingest.max_batch_events {
        app.metrics
            .rejected
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} events: at most ingest.max_batch_events ({}) per request",
                batch.len(),
                app.rt.ingest.max_batch_events
            ),
        );
    }
    let et = &compiled.event_type;
    let failures: Vec<Vec<events::Failure>> = batch
        .iter()
        .map(|event| {
            let mut f = events::check_envelope(event, &et.partition_key);
            if event.is_object() {
                let body = events::body(event);
                f.extend(
                    compiled
                        .validator
                        .iter_errors(&body)
                        .take(ERRORS_PER_EVENT)
                        .map(|e| events::Failure {
                            pointer: e.instance_path().to_string(),
                            reason: e.to_string(),
                        }),
                );
            }
            f
        })
        .collect();
    let report = events::report(&batch, failures);
    if !report.is_empty() {
        app.metrics
            .rejected
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        return json_response(StatusCode::UNPROCESSABLE_ENTITY, &report);
    }
    // Events Kafka has from an earlier try of this batch (their eid is known), or twice in
    // this batch, are not produced again.
    let given: Vec<Option<String>> = batch
        .iter()
        .map(|e| {
            e.pointer("/metadata/eid")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    let skip: Vec<bool> = {
        let now = Instant::now();
        let mut recent = app.recent.lock().unwrap_or_else(|p| p.into_inner());
        let mut in_batch = std::collections::HashSet::new();
        given
            .iter()
            .map(|eid| {
                eid.as_deref().is_some_and(|e| {
                    recent.contains(name, e, now) || !in_batch.insert(e.to_string())
                })
            })
            .collect()
    };
    let to_send = skip.iter().filter(|s| !**s).count();
    if to_send == 0 {
        return StatusCode::OK.into_response();
    }
    let Ok(_permits) = app.in_flight.clone().try_acquire_many_owned(to_send as u32) else {
        app.metrics.throttled.fetch_add(1, Ordering::Relaxed);
        let mut r = problem(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "more than ingest.max_in_flight_events ({}) events wait for Kafka: retry after a second",
                app.rt.ingest.max_in_flight_events
            ),
        );
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            HeaderValue::from_static("1"),
        );
        return r;
    };

    let received_at = saiki_core::time::format_unix_micros(saiki_core::time::unix_micros_now());
    let stamp = events::Stamp {
        event_type: name,
        schema_version: et.schema_version,
        received_at: &received_at,
        flow_id,
    };
    let topic = app.rt.topic(name);
    if let Err(e) = app.kafka.ensure_topic(&topic).await {
        app.metrics.kafka_failures.fetch_add(1, Ordering::Relaxed);
        return unavailable(&e);
    }
    let mut pending = Vec::with_capacity(batch.len());
    {
        let kafka = &app.kafka;
        for (event, _) in batch.iter_mut().zip(&skip).filter(|(_, s)| !**s) {
            let eid = events::enrich(event, &stamp);
            let key = events::key(event, &et.partition_key);
            let payload = event.to_string();
            let all_headers;
            let hs: &[(&'static str, String)] = if app.rt.kafka.headers {
                all_headers = [
                    ("saiki.event_type", name.to_string()),
                    ("saiki.eid", eid),
                    ("saiki.flow_id", flow_id.to_string()),
                ];
                &all_headers
            } else {
                &[]
            };
            let sent = kafka
                .send(&Outgoing {
                    topic: &topic,
                    partition: None,
                    key: key.as_deref().map(str::as_bytes),
                    payload: Some(payload.as_bytes()),
                    headers: hs,
                })
                .await;
            match sent {
                Ok(f) => pending.push(f),
                Err(e) => {
                    app.metrics.kafka_failures.fetch_add(1, Ordering::Relaxed);
                    return unavailable(&e);
                }
            }
        }
    }
    let acks = futures::future::join_all(pending);
    let outcome = match tokio::time::timeout(app.rt.ingest.ack_timeout, acks).await {
        Ok(results) => results.into_iter().find_map(|r| match r {
            Ok(Ok(_)) => None,
            Ok(Err((e, _))) => Some(e.to_string()),
            Err(_) => Some("the producer dropped the event".to_string()),
        }),
        Err(_) => Some(format!(
            "Kafka did not acknowledge the batch within ingest.ack_timeout ({:?})",
            app.rt.ingest.ack_timeout
        )),
    };
    match outcome {
        None => {
            app.metrics
                .published
                .fetch_add(to_send as u64, Ordering::Relaxed);
            let now = Instant::now();
            let mut recent = app.recent.lock().unwrap_or_else(|p| p.into_inner());
            for eid in given.iter().flatten() {
                recent.insert(name, eid, now);
            }
            StatusCode::OK.into_response()
        }
        Some(why) => {
            app.metrics.kafka_failures.fetch_add(1, Ordering::Relaxed);
            warn!(event_type = %name, error = %why, events = batch.len(), "batch not acknowledged");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{why}: some events of the batch may be in Kafka; retry the batch with the same metadata.eid values"),
            )
        }
    }
}
