//! The snapshot driver of a source session: which chunk is being read, its watermark window,
//! the side connection and task that read it, and when its progress may be written. The
//! algorithm and the statements are in [`crate::source::snapshot`]; the session
//! (`source/mod.rs`) calls the driver at four points and produces what it hands back:
//!
//! - [`SnapshotDriver::step`] on a timer and whenever the slot's confirmable position moves:
//!   writes the progress of a chunk Kafka has, or starts reading the next one;
//! - [`SnapshotDriver::joined`] in the session's `select!`: the chunk task finished;
//! - [`SnapshotDriver::observe`] for every streamed change (the window's bookkeeping);
//! - [`SnapshotDriver::watermark`] for every `saiki.snapshot` message: at the high watermark
//!   it hands the chunk and its window to the session, which produces the rows the window
//!   keeps and calls [`SnapshotDriver::produced`].
//!
//! Errors of the side connection are logged and retried at the next step: the stream never
//! stops for a snapshot, and a chunk whose progress was not written is read again
//! (duplicates, never a gap).

use saiki_core::Lsn;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::error::RelayError;
use crate::metrics::SourceMetrics;
use crate::pg::dsn::Dsn;
use crate::pg::PgConn;
use crate::source::snapshot::{self, Chunk, Mark, Watermark, Window};
use crate::source::SESSION_OPTIONS;

/// What a chunk-reading task gives back: its connection (if still usable) and the chunk.
type ChunkRead = (Option<PgConn>, Result<Option<Chunk>, RelayError>);

/// Where the session's snapshot is.
enum State {
    /// Nothing running; the next step looks for a requested table.
    Idle,
    /// A chunk is read between watermarks `id`; the window opens at the low watermark.
    Reading {
        id: String,
        window: Option<Window>,
        chunk: Option<Chunk>,
    },
    /// The chunk's rows are produced at the high watermark (`commit_lsn`); once the slot can
    /// be confirmed past it, the progress is written.
    Acking {
        table: String,
        commit_lsn: Lsn,
        last_key: Option<Vec<Option<String>>>,
        rows: usize,
        done: bool,
    },
    /// The source database has no saiki extension: no snapshots in this session.
    Unavailable,
}

/// A chunk read between its watermarks, to be produced at the high one.
pub(crate) struct ReadyChunk {
    pub(crate) chunk: Chunk,
    pub(crate) window: Window,
}

/// The snapshot driver of one source session.
pub(crate) struct SnapshotDriver {
    state: State,
    task: Option<JoinHandle<ChunkRead>>,
    conn: Option<PgConn>,
    seq: u64,
    dsn: Dsn,
    slot: String,
    chunk_rows: usize,
}

impl SnapshotDriver {
    pub(crate) fn new(dsn: Dsn, slot: String, chunk_rows: usize) -> Self {
        SnapshotDriver {
            state: State::Idle,
            task: None,
            conn: None,
            seq: 0,
            dsn,
            slot,
            chunk_rows,
        }
    }

    /// Whether the chunk produced last can be confirmed up to its high watermark
    /// (`confirmable` is the ack tracker's): then [`Self::step`] has work at once.
    pub(crate) fn chunk_confirmable(&self, confirmable: Lsn) -> bool {
        matches!(&self.state, State::Acking { commit_lsn, .. } if confirmable >= *commit_lsn)
    }

    /// Records a finished chunk once Kafka has all of it (the slot can be confirmed past its
    /// high watermark), then, when idle, starts reading the next chunk on a task.
    pub(crate) async fn step(&mut self, confirmable: Lsn, metrics: &SourceMetrics) {
        if let State::Acking { commit_lsn, .. } = &self.state {
            if confirmable < *commit_lsn {
                return;
            }
            let State::Acking {
                table,
                last_key,
                rows,
                done,
                ..
            } = std::mem::replace(&mut self.state, State::Idle)
            else {
                return;
            };
            self.record_progress(&table, last_key.as_deref(), rows, done, metrics)
                .await;
        }
        if !matches!(self.state, State::Idle) || self.task.is_some() {
            return;
        }
        self.seq += 1;
        let id = format!(
            "{}-{}-{}",
            std::process::id(),
            saiki_core::time::unix_micros_now(),
            self.seq
        );
        let conn = self.conn.take();
        let dsn = self.dsn.clone();
        let slot = self.slot.clone();
        let max_rows = self.chunk_rows;
        let task_id = id.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conn = match conn {
                Some(c) => c,
                None => match PgConn::connect(&dsn, false, SESSION_OPTIONS).await {
                    Ok(c) => c,
                    Err(e) => return (None, Err(e)),
                },
            };
            let r = async {
                let Some(next) = snapshot::next_table(&mut conn, &slot).await? else {
                    return Ok(None);
                };
                snapshot::read_chunk(&mut conn, &slot, &task_id, &next, max_rows).await
            }
            .await;
            match r {
                Ok(c) => (Some(conn), Ok(c)),
                Err(e) => (None, Err(e)),
            }
        }));
        self.state = State::Reading {
            id,
            window: None,
            chunk: None,
        };
    }

    async fn record_progress(
        &mut self,
        table: &str,
        last_key: Option<&[Option<String>]>,
        rows: usize,
        done: bool,
        metrics: &SourceMetrics,
    ) {
        let r = async {
            let conn = match self.conn.take() {
                Some(c) => c,
                None => PgConn::connect(&self.dsn, false, SESSION_OPTIONS).await?,
            };
            let conn = self.conn.insert(conn);
            snapshot::record_progress(conn, &self.slot, table, last_key, rows, done).await
        }
        .await;
        match r {
            Ok((rows_done, estimated)) => {
                metrics.snapshot_progress(table, rows_done, estimated.max(rows_done));
                let percent = if done {
                    100.0
                } else if estimated > 0 {
                    (100.0 * rows_done as f64 / estimated as f64).min(100.0)
                } else {
                    0.0
                };
                info!(
                    table,
                    rows_done,
                    estimated,
                    percent = format!("{percent:.1}"),
                    done,
                    "snapshot progress"
                );
            }
            Err(e) => {
                // The chunk is read again: duplicates, never a gap.
                warn!(table, error = %e, "could not record snapshot progress; the chunk will be read again");
                self.conn = None;
            }
        }
    }

    /// Waits for the chunk task to finish and takes in what it read (never resolves while
    /// no task runs): for the session's `select!`.
    pub(crate) async fn joined(&mut self) {
        let out = match &mut self.task {
            Some(h) => h.await,
            None => std::future::pending().await,
        };
        self.task = None;
        let out = out.unwrap_or_else(|e| {
            (
                None,
                Err(RelayError::Internal(format!(
                    "the snapshot task failed: {e}"
                ))),
            )
        });
        self.chunk_read(out);
    }

    fn chunk_read(&mut self, (conn, result): ChunkRead) {
        self.conn = conn;
        match result {
            Ok(Some(c)) => {
                if let State::Reading { chunk, .. } = &mut self.state {
                    *chunk = Some(c);
                }
            }
            Ok(None) => self.state = State::Idle,
            Err(RelayError::Server { error, .. })
                if error.code == "42P01" || error.code == "42883" =>
            {
                debug!("no saiki extension in the source database: snapshots are off");
                self.state = State::Unavailable;
            }
            Err(e) => {
                warn!(error = %e, "reading a snapshot chunk failed; trying again");
                self.state = State::Idle;
            }
        }
    }

    /// A streamed change while a chunk is read: its keys (or, for a truncate, its tables)
    /// leave the chunk, so that the streamed change stands.
    pub(crate) fn observe(
        &mut self,
        table: &str,
        key: Option<&str>,
        old_key: Option<&str>,
        truncated: Option<&[(String, String)]>,
    ) {
        if let State::Reading {
            window: Some(w), ..
        } = &mut self.state
        {
            match truncated {
                Some(tables) => w.observe_truncate(
                    &tables
                        .iter()
                        .map(|(s, t)| format!("{s}.{t}"))
                        .collect::<Vec<_>>(),
                ),
                None => w.observe(table, key, old_key),
            }
        }
    }

    /// A streamed transaction that changed `tables` committed: a chunk of one of them whose
    /// window is open is read again.
    pub(crate) fn observe_streamed_commit(&mut self, tables: &[&str]) {
        if let State::Reading {
            window: Some(w), ..
        } = &mut self.state
        {
            w.observe_streamed_commit(tables);
        }
    }

    /// A `saiki.snapshot` message (its content, a JSON string) from the stream. At the high
    /// watermark of the chunk being read, the chunk and its window are handed back to be
    /// produced; watermarks of other sessions or relays are ignored.
    pub(crate) async fn watermark(&mut self, content: Option<&str>) -> Option<ReadyChunk> {
        let wm: Watermark = serde_json::from_str(content?).ok()?;
        let State::Reading { id, .. } = &self.state else {
            return None; // a watermark of an earlier session or relay: nothing to do
        };
        if *id != wm.id {
            return None;
        }
        match wm.mark {
            Mark::Low => {
                if let State::Reading { window, .. } = &mut self.state {
                    let mut w = Window::new(wm.table.clone());
                    w.low_seen = true;
                    *window = Some(w);
                }
                None
            }
            Mark::High => {
                if self.task.is_some() {
                    // The task wrote this watermark as its last step: it is about to finish.
                    self.joined().await;
                }
                let State::Reading {
                    window: Some(window),
                    chunk: Some(chunk),
                    ..
                } = std::mem::replace(&mut self.state, State::Idle)
                else {
                    return None;
                };
                if window.void {
                    // Idle: the next step reads the chunk again from the recorded progress.
                    debug!(table = %window.table, "a streamed transaction committed inside the chunk's window: reading the chunk again");
                    return None;
                }
                Some(ReadyChunk { chunk, window })
            }
        }
    }

    /// The session produced the chunk's kept rows at `commit_lsn` (the high watermark's):
    /// its progress is written once the slot can be confirmed past that.
    pub(crate) fn produced(&mut self, chunk: &Chunk, commit_lsn: Lsn) {
        self.state = State::Acking {
            table: chunk.table.clone(),
            commit_lsn,
            last_key: chunk.rows.last().map(|r| r.key_text.clone()),
            rows: chunk.rows.len(),
            done: chunk.last,
        };
    }
}
