//! The command line of `saiki-relay`: flags over the configuration, one subcommand each for
//! the daemons (`source`, `sink`) and the operator commands (`snapshot`, `status`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::config::{Config, LogFormat, REFERENCE};
use crate::error::RelayError;
use crate::metrics::{SinkMetrics, SourceMetrics};
use crate::sink::{self, SinkRuntime};
use crate::source::{self, SourceRuntime};
use clap::{Parser, Subcommand};
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "saiki-relay",
    version,
    about = "Saiki change data capture relay: PostgreSQL slot → Kafka → ODS",
    after_help = "Configuration: a TOML file (--config), then SAIKI_<SECTION>_<KEY> environment variables \
(e.g. SAIKI_SOURCE_DSN), then flags. `saiki-relay --help-config` prints every key with its default.\n\
Exit codes: 0 done (SIGTERM drains and confirms), 2 configuration, 3 source database, 4 Kafka, 5 unreadable change record, 6 ODS database, 7 internal error (a bug: report it with the log)."
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print every configuration key with its default and meaning, then exit.
    #[arg(long)]
    help_config: bool,
    /// Log format (overrides log.format).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Stream a replication slot into Kafka.
    Source {
        /// source.name
        #[arg(long)]
        name: Option<String>,
        /// source.dsn
        #[arg(long)]
        dsn: Option<String>,
        /// source.slot
        #[arg(long)]
        slot: Option<String>,
        /// kafka.brokers
        #[arg(long)]
        brokers: Option<String>,
        /// http.listen ("" turns the endpoint off)
        #[arg(long)]
        listen: Option<String>,
    },
    /// Materialize Kafka topics into the ODS, exactly once.
    Sink {
        /// sink.dsn
        #[arg(long)]
        dsn: Option<String>,
        /// kafka.brokers
        #[arg(long)]
        brokers: Option<String>,
        /// sink.group
        #[arg(long)]
        group: Option<String>,
        /// http.listen ("" turns the endpoint off)
        #[arg(long)]
        listen: Option<String>,
    },
    /// Serve the HTTP event API: event types with JSON Schemas, events validated and
    /// produced to Kafka (docs/ingest.md).
    Ingest {
        /// ingest.dsn (the registry database)
        #[arg(long)]
        dsn: Option<String>,
        /// kafka.brokers
        #[arg(long)]
        brokers: Option<String>,
        /// http.listen for /metrics ("" turns the endpoint off)
        #[arg(long)]
        listen: Option<String>,
    },
    /// Write the change topics into Apache Iceberg change-log tables (docs/lake.md).
    Lake {
        /// lake.warehouse
        #[arg(long)]
        warehouse: Option<String>,
        /// kafka.brokers
        #[arg(long)]
        brokers: Option<String>,
        /// http.listen ("" turns the endpoint off)
        #[arg(long)]
        listen: Option<String>,
    },
    /// Makes a bearer token for the event API in its registry and prints it (the API's
    /// `POST /tokens` does the same for an admin token's holder).
    Token {
        /// A scope: admin, read, or write:<event type>; repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// ingest.dsn (the registry database; default sink.dsn of --config)
        #[arg(long)]
        dsn: Option<String>,
    },
    /// Asks the source relay of this config (its slot) to snapshot tables, now, while it runs:
    /// rows that exist are brought into Kafka and the ODS (again), consistent with the stream.
    Snapshot {
        /// A table to snapshot (schema.table); repeat for several.
        #[arg(long = "table", required = true)]
        tables: Vec<String>,
        /// source.dsn
        #[arg(long)]
        dsn: Option<String>,
        /// source.slot (default saiki_<source.name>)
        #[arg(long)]
        slot: Option<String>,
    },
    /// The slots of a source database (saiki.slot_status()) and the health, lag and freshness
    /// of running relays (their /health, /ready, /metrics).
    Status {
        /// A source database (default: source.dsn of --config).
        #[arg(long)]
        dsn: Option<String>,
        /// A relay's HTTP address (http://host:port); repeat for several. Default: http.listen
        /// of --config, if the config names a source or a sink.
        #[arg(long = "relay")]
        relays: Vec<String>,
        /// JSON ({"slots": [...], "relays": [...]}) instead of tables.
        #[arg(long)]
        json: bool,
        /// Exit 1 unless every relay asked is healthy and ready (for health checks).
        #[arg(long)]
        check: bool,
    },
}

/// Runs the command line; the exit code says how it ended (see `--help`).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.help_config {
        print!("{REFERENCE}");
        return ExitCode::SUCCESS;
    }
    let Some(command) = cli.command else {
        eprintln!(
            "saiki-relay: name a command: source, sink, ingest, token, snapshot or status (see --help)"
        );
        return ExitCode::from(2);
    };
    let mut cfg = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("saiki-relay: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    init_logging(cli.log_format.unwrap_or(cfg.log.format), &cfg.log.level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("saiki-relay: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        match command {
            Command::Source { name, dsn, slot, brokers, listen } => {
                let mut src = cfg.source.take().ok_or_else(|| {
                    RelayError::Config("no [source] section: give source.name and source.dsn (file, SAIKI_SOURCE_*, or flags)".into())
                });
                if src.is_err() && name.is_some() && dsn.is_some() {
                    src = toml::from_str(&format!("name = {:?}\ndsn = {:?}", name.clone().unwrap(), dsn.clone().unwrap()))
                        .map_err(|e| RelayError::Config(e.to_string()));
                }
                let mut src = src?;
                if let Some(v) = name { src.name = v; }
                if let Some(v) = dsn { src.dsn = v; }
                if let Some(v) = slot { src.slot = Some(v); }
                if let Some(v) = brokers { cfg.kafka.brokers = v; }
                if let Some(v) = listen { cfg.http.listen = v; }
                run_source(src, cfg).await
            }
            Command::Sink { dsn, brokers, group, listen } => {
                let mut sink = cfg.sink.take();
                if sink.is_none() {
                    if let Some(d) = &dsn {
                        sink = Some(toml::from_str(&format!("dsn = {d:?}")).map_err(|e| RelayError::Config(e.to_string()))?);
                    }
                }
                let mut sink = sink.ok_or_else(|| {
                    RelayError::Config("no [sink] section: give sink.dsn (file, SAIKI_SINK_DSN, or --dsn)".into())
                })?;
                if let Some(v) = dsn { sink.dsn = v; }
                if let Some(v) = group { sink.group = v; }
                if let Some(v) = brokers { cfg.kafka.brokers = v; }
                if let Some(v) = listen { cfg.http.listen = v; }
                run_sink(sink, cfg).await
            }
            Command::Ingest { dsn, brokers, listen } => {
                let mut ingest = match cfg.ingest.take() {
                    Some(i) => i,
                    None => toml::from_str("").map_err(|e| RelayError::Config(e.to_string()))?,
                };
                if let Some(v) = dsn { ingest.dsn = Some(v); }
                if let Some(v) = brokers { cfg.kafka.brokers = v; }
                if let Some(v) = listen { cfg.http.listen = v; }
                run_ingest(ingest, cfg).await
            }
            Command::Lake { warehouse, brokers, listen } => {
                let mut lake = match cfg.lake.take() {
                    Some(l) => l,
                    None => toml::from_str("").map_err(|e| RelayError::Config(e.to_string()))?,
                };
                if let Some(v) = warehouse { lake.warehouse = v; }
                if let Some(v) = brokers { cfg.kafka.brokers = v; }
                if let Some(v) = listen { cfg.http.listen = v; }
                run_lake(lake, cfg).await
            }
            Command::Token { scopes, dsn } => {
                let dsn = dsn
                    .or_else(|| cfg.ingest.as_ref().and_then(|i| i.dsn.clone()))
                    .or_else(|| cfg.sink.as_ref().map(|s| s.dsn.clone()))
                    .ok_or_else(|| RelayError::Config("token needs the registry database: --dsn, or ingest.dsn (or sink.dsn) in --config".into()))?;
                let token = crate::ingest::make_token(&dsn, &scopes).await?;
                println!("{token}");
                Ok(())
            }
            Command::Snapshot { tables, dsn, slot } => {
                let dsn = dsn
                    .or_else(|| cfg.source.as_ref().map(|s| s.dsn.clone()))
                    .ok_or_else(|| RelayError::Config("snapshot needs the source database: --dsn, or source.dsn in --config".into()))?;
                let slot = match (slot, cfg.source.take()) {
                    (Some(s), _) => s,
                    (None, Some(src)) => crate::source::SourceRuntime::new(src, cfg.kafka.clone())?.slot,
                    (None, None) => return Err(RelayError::Config("snapshot needs the relay's slot: --slot, or [source] in --config".into())),
                };
                request_snapshots(&dsn, &slot, &tables).await
            }
            Command::Status { mut dsn, mut relays, json, check } => {
                // Nothing named on the command line: what the config describes.
                if dsn.is_none() && relays.is_empty() {
                    dsn = cfg.source.as_ref().map(|s| s.dsn.clone());
                    if (cfg.source.is_some() || cfg.sink.is_some()) && !cfg.http.listen.is_empty() {
                        relays.push(format!("http://{}", cfg.http.listen));
                    }
                }
                if dsn.is_none() && relays.is_empty() {
                    return Err(RelayError::Config("status needs a source database (--dsn, or source.dsn in --config) or a relay (--relay http://host:port)".into()));
                }
                if status(dsn.as_deref(), &relays, json).await? || !check {
                    Ok(())
                } else {
                    std::process::exit(1)
                }
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, transient = e.is_transient(), "stopping");
            eprintln!("saiki-relay: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if format == LogFormat::Json {
        b.json().init();
    } else {
        b.init();
    }
}

async fn run_source(src: crate::config::SourceConfig, cfg: Config) -> Result<(), RelayError> {
    let runtime = Arc::new(SourceRuntime::new(src, cfg.kafka.clone())?);
    let metrics = Arc::new(SourceMetrics::default());
    let _http = if cfg.http.listen.is_empty() {
        None
    } else {
        Some(
            crate::http::serve(
                &cfg.http.listen,
                Arc::new(crate::metrics::SourceExporter {
                    source: runtime.source.name.clone(),
                    metrics: metrics.clone(),
                }),
            )
            .await?,
        )
    };
    source::run(runtime, metrics, shutdown_signal()).await
}

async fn run_sink(sink: crate::config::SinkConfig, cfg: Config) -> Result<(), RelayError> {
    let registry = cfg.ingest.as_ref().and_then(|i| i.dsn.as_deref());
    let runtime = Arc::new(SinkRuntime::new(sink, cfg.kafka.clone(), registry)?);
    let metrics = Arc::new(SinkMetrics::new(&runtime.sink.group));
    let _http = if cfg.http.listen.is_empty() {
        None
    } else {
        Some(crate::http::serve(&cfg.http.listen, metrics.clone()).await?)
    };
    sink::run(runtime, metrics, shutdown_signal()).await
}

async fn run_ingest(ingest: crate::config::IngestConfig, cfg: Config) -> Result<(), RelayError> {
    let sink_dsn = cfg.sink.as_ref().map(|s| s.dsn.as_str());
    let runtime = Arc::new(crate::ingest::IngestRuntime::new(
        ingest,
        sink_dsn,
        cfg.kafka.clone(),
    )?);
    let metrics = Arc::new(crate::metrics::IngestMetrics::default());
    let _http = if cfg.http.listen.is_empty() {
        None
    } else {
        Some(crate::http::serve(&cfg.http.listen, metrics.clone()).await?)
    };
    crate::ingest::run(runtime, metrics, shutdown_signal()).await
}

#[cfg(feature = "lake")]
async fn run_lake(lake: crate::config::LakeConfig, cfg: Config) -> Result<(), RelayError> {
    let sink_dsn = cfg.sink.as_ref().map(|s| s.dsn.as_str());
    let registry = cfg.ingest.as_ref().and_then(|i| i.dsn.as_deref());
    let runtime = Arc::new(crate::lake::LakeRuntime::new(
        lake,
        cfg.kafka.clone(),
        sink_dsn,
        registry,
    )?);
    let metrics = Arc::new(crate::metrics::LakeMetrics::default());
    let _http = if cfg.http.listen.is_empty() {
        None
    } else {
        Some(crate::http::serve(&cfg.http.listen, metrics.clone()).await?)
    };
    crate::lake::run(runtime, metrics, shutdown_signal()).await
}

#[cfg(not(feature = "lake"))]
async fn run_lake(_lake: crate::config::LakeConfig, _cfg: Config) -> Result<(), RelayError> {
    Err(RelayError::Config(
        "this saiki-relay was built without the lake (cargo feature \"lake\"): build it with the default features".into(),
    ))
}

/// A watch that turns true on SIGTERM or Ctrl-C.
fn shutdown_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

async fn request_snapshots(dsn: &str, slot: &str, tables: &[String]) -> Result<(), RelayError> {
    let d = crate::pg::dsn::Dsn::parse(dsn).map_err(|e| RelayError::Config(format!("dsn: {e}")))?;
    let mut conn = crate::pg::PgConn::connect(&d, false, "").await?;
    for t in tables {
        crate::source::snapshot::request(&mut conn, slot, t).await?;
        println!("snapshot of {t} requested for slot {slot}; progress: saiki-relay status");
    }
    Ok(())
}

/// Prints the status; true when every relay is healthy and ready.
async fn status(dsn: Option<&str>, relays: &[String], json: bool) -> Result<bool, RelayError> {
    use crate::status::{render, slots, RelayStatus};
    let db = match dsn {
        Some(d) => Some(slots(d).await?),
        None => None,
    };
    let relays = futures::future::join_all(relays.iter().map(|r| RelayStatus::fetch(r))).await;
    if json {
        let v = serde_json::json!({
            "slots": db.as_ref().map(|d| &d.slots),
            "snapshots": db.as_ref().map_or(&[][..], |d| &d.snapshots[..]),
            "resyncs": db.as_ref().map_or(&[][..], |d| &d.resyncs[..]),
            "relays": relays,
        });
        println!("{v}");
    } else {
        print!("{}", render(db.as_ref(), &relays));
    }
    Ok(relays.iter().all(|r| r.healthy && r.ready))
}
