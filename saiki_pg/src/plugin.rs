//! The `saiki` logical decoding output plugin: PostgreSQL's callbacks, as a thin unsafe shell
//! around `saiki_core`'s option parser and record encoder.
//!
//! Invariants:
//! - One output message per record (docs/plugin.md), never one per transaction: memory does not
//!   grow with the transaction. Every callback allocates in `change_cxt`, reset when it ends.
//! - Nothing about data raises an ERROR: every datum is written (see `value.rs`); an ERROR is
//!   raised only for a bad option, naming it, with SQLSTATE 22023.
//! - The state lives exactly as long as the decoding context: it is freed by a reset callback
//!   on `ctx->context`, so an ERROR that skips the shutdown callback does not leak it.
//! - Nothing outside a callback's own arguments touches the state: the relcache callback
//!   only queues invalidated relids, which the next lookup applies (`rel_info`).

use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;
use saiki_core::encode::{self, Head, ObjectWriter};
use saiki_core::options::Options;
use saiki_core::record::Action;
use saiki_core::Lsn;

use crate::relation::{self, RelInfo};
use crate::value::{is_external_ondisk, TypeCache};

/// Records larger than this leave the buffer shrunk back after they are written, so that
/// one huge row does not keep its memory for the rest of the session.
const BUF_KEEP_BYTES: usize = 1 << 20;

struct State {
    opts: Options,
    change_cxt: pg_sys::MemoryContext,
    /// The record being written.
    buf: Vec<u8>,
    /// Records written but not yet sent, joined by `\n` (only with `batch-bytes`).
    batch: Vec<u8>,
    types: TypeCache,
    rels: HashMap<pg_sys::Oid, Rc<RelInfo>>,
    origins: HashMap<pg_sys::RepOriginId, Option<Vec<u8>>>,
    /// Non-streamed transaction being replayed: ordinal of its last change.
    seq: u64,
    /// `B` is owed before the next record (skip-empty-xacts).
    begin_pending: bool,
    /// `B` was written, so `C` is owed at commit.
    begin_written: bool,
    /// Streamed transactions in progress: ordinal of the last change, by top-level xid.
    stream_seq: HashMap<pg_sys::TransactionId, u64>,
    last_stream_lsn: pg_sys::XLogRecPtr,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    toast: Vec<usize>,
}

/// Relations whose cached facts PostgreSQL has invalidated since the plugin last looked.
/// The relcache callback only records here; it never touches the plugin state, so it cannot
/// alias a `&mut State` when it fires in the middle of a callback's own catalog access.
/// PostgreSQL backends are single-threaded.
#[derive(Default)]
struct Invalidations {
    all: bool,
    relids: Vec<pg_sys::Oid>,
}

/// More pending relids than this collapse into "all" (bounded memory between sessions).
const MAX_PENDING_INVALIDATIONS: usize = 1024;

thread_local! {
    static INVALIDATIONS: std::cell::RefCell<Invalidations> = std::cell::RefCell::new(Invalidations::default());
}
static RELCACHE_CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

#[pg_guard]
unsafe extern "C-unwind" fn relcache_invalidated(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    INVALIDATIONS.with(|inv| {
        let mut inv = inv.borrow_mut();
        if relid == pg_sys::InvalidOid || inv.relids.len() >= MAX_PENDING_INVALIDATIONS {
            inv.all = true;
            inv.relids.clear();
        } else if !inv.all {
            inv.relids.push(relid);
        }
    });
}

/// Drops the cached facts of invalidated relations; returns whether `watch` was among them.
fn apply_invalidations(rels: &mut HashMap<pg_sys::Oid, Rc<RelInfo>>, watch: pg_sys::Oid) -> bool {
    INVALIDATIONS.with(|inv| {
        let mut inv = inv.borrow_mut();
        if inv.all {
            inv.all = false;
            inv.relids.clear();
            rels.clear();
            return true;
        }
        let mut hit = false;
        for relid in inv.relids.drain(..) {
            hit |= relid == watch;
            rels.remove(&relid);
        }
        hit
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn free_state(arg: *mut std::ffi::c_void) {
    // SAFETY: `arg` is the Box leaked in startup; this reset callback runs once.
    drop(unsafe { Box::from_raw(arg as *mut State) });
}

/// Entry point PostgreSQL looks up when a slot's plugin is `saiki`.
///
/// # Safety
/// Called by PostgreSQL with a valid callbacks struct.
#[pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: PostgreSQL passes a valid, zeroed struct to fill.
    let cb = unsafe { &mut *cb };
    cb.startup_cb = Some(startup);
    cb.begin_cb = Some(begin);
    cb.change_cb = Some(change);
    cb.truncate_cb = Some(truncate);
    cb.commit_cb = Some(commit);
    cb.message_cb = Some(message);
    cb.filter_by_origin_cb = Some(filter_by_origin);
    cb.shutdown_cb = Some(shutdown);
    cb.stream_start_cb = Some(stream_start);
    cb.stream_stop_cb = Some(stream_stop);
    cb.stream_abort_cb = Some(stream_abort);
    cb.stream_commit_cb = Some(stream_commit);
    cb.stream_change_cb = Some(stream_change);
    cb.stream_message_cb = Some(stream_message);
    cb.stream_truncate_cb = Some(stream_truncate);
}

/// Raises ERROR with SQLSTATE 22023 (invalid_parameter_value): the plugin's only ERROR.
fn raise_invalid_parameter(message: String) -> ! {
    pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message,
        "saiki",
    )
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// Reads the (name, value) option pairs of the session.
unsafe fn read_options(list: *mut pg_sys::List) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    // SAFETY: a List of DefElem built by PostgreSQL.
    unsafe {
        let list = pgrx::PgList::<pg_sys::DefElem>::from_pg(list);
        for elem in list.iter_ptr() {
            let name = CStr::from_ptr((*elem).defname)
                .to_string_lossy()
                .into_owned();
            let arg = (*elem).arg;
            let value = if arg.is_null() {
                None
            } else if (*arg).type_ == pg_sys::NodeTag::T_String {
                let s = (*(arg as *mut pg_sys::String)).sval;
                Some(CStr::from_ptr(s).to_string_lossy().into_owned())
            } else {
                raise_invalid_parameter(format!("option \"{name}\" must have a text value"))
            };
            out.push((name, value));
        }
    }
    out
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    opt: *mut pg_sys::OutputPluginOptions,
    _is_init: bool,
) {
    // SAFETY: PostgreSQL passes a valid context and options struct.
    unsafe {
        let pairs = read_options((*ctx).output_plugin_options);
        let opts = match Options::parse(pairs.iter().map(|(n, v)| (n.as_str(), v.as_deref()))) {
            Ok(o) => o,
            Err(e) => raise_invalid_parameter(e.to_string()),
        };
        (*opt).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_TEXTUAL_OUTPUT;
        (*opt).receive_rewrites = false;
        // Streaming happens only when the client asked for it (and PostgreSQL allows it).
        (*ctx).streaming &= opts.stream_changes;

        let change_cxt = pg_sys::AllocSetContextCreateInternal(
            (*ctx).context,
            c"saiki change".as_ptr(),
            0,
            8 * 1024,
            8 * 1024 * 1024,
        );
        let numbers = opts.numbers_as_strings;
        let st = Box::into_raw(Box::new(State {
            opts,
            change_cxt,
            buf: Vec::with_capacity(8192),
            batch: Vec::new(),
            types: TypeCache::new((*ctx).context, numbers),
            rels: HashMap::new(),
            origins: HashMap::new(),
            seq: 0,
            begin_pending: false,
            begin_written: false,
            stream_seq: HashMap::new(),
            last_stream_lsn: 0,
            values: Vec::new(),
            nulls: Vec::new(),
            toast: Vec::new(),
        }));
        let cb = pg_sys::MemoryContextAlloc(
            (*ctx).context,
            std::mem::size_of::<pg_sys::MemoryContextCallback>(),
        ) as *mut pg_sys::MemoryContextCallback;
        (*cb).func = Some(free_state);
        (*cb).arg = st as *mut std::ffi::c_void;
        (*cb).next = std::ptr::null_mut();
        pg_sys::MemoryContextRegisterResetCallback((*ctx).context, cb);
        (*ctx).output_plugin_private = st as *mut std::ffi::c_void;
        // Whatever was invalidated before this session is irrelevant: its cache starts empty.
        INVALIDATIONS.with(|inv| *inv.borrow_mut() = Invalidations::default());
        if !RELCACHE_CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
            pg_sys::CacheRegisterRelcacheCallback(
                Some(relcache_invalidated),
                pg_sys::Datum::from(0usize),
            );
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(_ctx: *mut pg_sys::LogicalDecodingContext) {
    // The state is freed with the decoding context (free_state).
}

/// The plugin state of a decoding context.
unsafe fn state<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut State {
    // SAFETY: set in startup, valid until the context is deleted.
    unsafe { &mut *((*ctx).output_plugin_private as *mut State) }
}

/// Writes `bytes` as one output message.
unsafe fn write_message_bytes(ctx: *mut pg_sys::LogicalDecodingContext, bytes: &[u8], last: bool) {
    // SAFETY: the standard prepare/append/write sequence on the context's output buffer.
    unsafe {
        pg_sys::OutputPluginPrepareWrite(ctx, last);
        pg_sys::appendBinaryStringInfo(
            (*ctx).out,
            bytes.as_ptr() as *const std::ffi::c_char,
            bytes.len() as i32,
        );
        pg_sys::OutputPluginWrite(ctx, last);
    }
}

/// Hands the finished record in `st.buf` on: sent as its own message, or (with
/// `batch-bytes`) appended to the batch, which is sent once it is large enough.
unsafe fn emit(ctx: *mut pg_sys::LogicalDecodingContext, st: &mut State, last: bool) {
    if st.opts.batch_bytes == 0 {
        // SAFETY: forwarded from the callback.
        unsafe { write_message_bytes(ctx, &st.buf, last) };
    } else {
        if !st.batch.is_empty() {
            st.batch.push(b'\n');
        }
        st.batch.extend_from_slice(&st.buf);
        if st.batch.len() >= st.opts.batch_bytes {
            // SAFETY: forwarded from the callback.
            unsafe { flush_batch(ctx, st) };
        }
    }
    if st.buf.capacity() > BUF_KEEP_BYTES {
        st.buf = Vec::with_capacity(8192);
    }
    st.buf.clear();
}

/// Sends the pending batch, if any. Called at every point where a consumer must have
/// everything so far: commit, stream stop/abort/commit, non-transactional messages.
unsafe fn flush_batch(ctx: *mut pg_sys::LogicalDecodingContext, st: &mut State) {
    if st.batch.is_empty() {
        return;
    }
    // SAFETY: forwarded from the callback.
    unsafe { write_message_bytes(ctx, &st.batch, true) };
    if st.batch.capacity() > st.opts.batch_bytes.max(BUF_KEEP_BYTES) * 2 {
        st.batch = Vec::new();
    }
    st.batch.clear();
}

/// Runs `f` with the per-change memory context current, then resets it.
unsafe fn in_change_cxt<R>(st_cxt: pg_sys::MemoryContext, f: impl FnOnce() -> R) -> R {
    // SAFETY: switching to a live context and back; resetting frees only what `f` allocated.
    unsafe {
        let old = pg_sys::MemoryContextSwitchTo(st_cxt);
        let r = f();
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::MemoryContextReset(st_cxt);
        r
    }
}

fn top_txn(txn: *mut pg_sys::ReorderBufferTXN) -> *mut pg_sys::ReorderBufferTXN {
    // SAFETY: txn is a valid ReorderBufferTXN; toptxn is null for top-level transactions.
    unsafe {
        if (*txn).toptxn.is_null() {
            txn
        } else {
            (*txn).toptxn
        }
    }
}

/// The (sub)transaction of the message being streamed.
///
/// PostgreSQL 15 hands a streamed message's callback only the top-level transaction (unlike a
/// row's, whose `change->txn` names its subtransaction). But before it applies each change of
/// a streamed, in-progress transaction, reorderbuffer.c sets `CheckXidAlive` to the xid of that
/// change's (sub)transaction, to notice a concurrent abort (`SetupCheckXidLive`). That xid is
/// taken only if it is one of this transaction's subtransactions; in the stream of a
/// transaction that has committed meanwhile it is unset, and the message goes with the
/// top-level transaction (no subxid): nothing of a committed transaction is aborted any more.
unsafe fn streamed_message_txn(
    txn: *mut pg_sys::ReorderBufferTXN,
) -> *mut pg_sys::ReorderBufferTXN {
    // SAFETY: txn is a valid ReorderBufferTXN of the callback; its subtxns list links
    // ReorderBufferTXNs by their `node`, and an empty list may hold null pointers.
    unsafe {
        let top = top_txn(txn);
        let alive = pg_sys::CheckXidAlive;
        if alive == pg_sys::InvalidTransactionId || alive == (*top).xid {
            return top;
        }
        let head = &raw mut (*top).subtxns.head;
        let mut node = (*head).next;
        let offset = std::mem::offset_of!(pg_sys::ReorderBufferTXN, node);
        while !node.is_null() && node != head {
            let sub = node.byte_sub(offset) as *mut pg_sys::ReorderBufferTXN;
            if (*sub).xid == alive {
                return sub;
            }
            node = (*node).next;
        }
        top
    }
}

/// The head of a message's record (`M`, `L`): of its subtransaction when streamed.
unsafe fn message_head(
    st: &mut State,
    txn: *mut pg_sys::ReorderBufferTXN,
    action: Action,
    lsn: pg_sys::XLogRecPtr,
    streamed: bool,
) -> Head {
    // SAFETY: a valid transaction of the callback.
    unsafe {
        let change_txn = if streamed {
            streamed_message_txn(txn)
        } else {
            txn
        };
        change_head(st, txn, change_txn, action, lsn, streamed)
    }
}

/// The origin's name, cached; `None` for local changes or a dropped origin.
unsafe fn origin_name(st: &mut State, id: pg_sys::RepOriginId) -> Option<Vec<u8>> {
    if id == 0 {
        return None;
    }
    st.origins
        .entry(id)
        .or_insert_with(|| {
            let mut name: *mut std::ffi::c_char = std::ptr::null_mut();
            // SAFETY: missing_ok = true, so an unknown id returns false instead of raising.
            unsafe {
                if pg_sys::replorigin_by_oid(id, true, &mut name) && !name.is_null() {
                    Some(CStr::from_ptr(name).to_bytes().to_vec())
                } else {
                    None
                }
            }
        })
        .clone()
}

unsafe fn write_origin(st: &mut State, id: pg_sys::RepOriginId) {
    if !st.opts.include_origin {
        return;
    }
    // SAFETY: catalog lookup inside a decoding callback.
    if let Some(name) = unsafe { origin_name(st, id) } {
        encode::write_origin(&mut st.buf, &name);
    }
}

unsafe fn write_begin(
    ctx: *mut pg_sys::LogicalDecodingContext,
    st: &mut State,
    txn: *mut pg_sys::ReorderBufferTXN,
    last: bool,
) {
    // SAFETY: txn is valid for the callback.
    unsafe {
        encode::write_head(
            &mut st.buf,
            &Head {
                action: Action::Begin,
                xid: (*txn).xid.into_inner() as u64,
                lsn: Lsn((*txn).first_lsn),
                commit_lsn: Some(Lsn((*txn).end_lsn)),
                commit_ts: Some((*txn).xact_time.commit_time),
                streamed: false,
                subxid: None,
                seq: None,
            },
        );
        write_origin(st, (*txn).origin_id);
        encode::end(&mut st.buf);
        emit(ctx, st, last);
    }
    st.begin_pending = false;
    st.begin_written = true;
}

/// Writes the `B` owed under skip-empty-xacts before the first record of a transaction.
unsafe fn ensure_begin(
    ctx: *mut pg_sys::LogicalDecodingContext,
    st: &mut State,
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    if st.begin_pending {
        // SAFETY: forwarded from the callback.
        unsafe { write_begin(ctx, st, txn, false) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: valid callback arguments.
    let st = unsafe { state(ctx) };
    st.seq = 0;
    st.begin_written = false;
    st.begin_pending = false;
    if !st.opts.include_transaction {
        return;
    }
    if st.opts.skip_empty_xacts {
        st.begin_pending = true;
    } else {
        let cxt = st.change_cxt;
        // SAFETY: valid callback arguments.
        unsafe { in_change_cxt(cxt, || write_begin(ctx, st, txn, true)) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: valid callback arguments.
    let st = unsafe { state(ctx) };
    st.begin_pending = false;
    if !std::mem::take(&mut st.begin_written) {
        // SAFETY: valid callback arguments.
        unsafe { flush_batch(ctx, st) };
        return;
    }
    let cxt = st.change_cxt;
    // SAFETY: valid callback arguments.
    unsafe {
        in_change_cxt(cxt, || {
            encode::write_head(
                &mut st.buf,
                &Head {
                    action: Action::Commit,
                    xid: (*txn).xid.into_inner() as u64,
                    lsn: Lsn(commit_lsn),
                    commit_lsn: Some(Lsn((*txn).end_lsn)),
                    commit_ts: Some((*txn).xact_time.commit_time),
                    streamed: false,
                    subxid: None,
                    seq: None,
                },
            );
            write_origin(st, (*txn).origin_id);
            encode::end(&mut st.buf);
            emit(ctx, st, true);
            flush_batch(ctx, st);
        })
    };
}

/// The head of a change record; bumps the transaction's ordinal.
unsafe fn change_head(
    st: &mut State,
    txn: *mut pg_sys::ReorderBufferTXN,
    change_txn: *mut pg_sys::ReorderBufferTXN,
    action: Action,
    lsn: pg_sys::XLogRecPtr,
    streamed: bool,
) -> Head {
    let top = top_txn(txn);
    // SAFETY: valid transactions for the callback.
    unsafe {
        let xid = (*top).xid;
        let seq = if streamed {
            st.last_stream_lsn = lsn;
            let s = st.stream_seq.entry(xid).or_insert(0);
            *s += 1;
            *s
        } else {
            st.seq += 1;
            st.seq
        };
        let subxid = if streamed && !change_txn.is_null() && (*change_txn).xid != xid {
            Some((*change_txn).xid.into_inner() as u64)
        } else {
            None
        };
        Head {
            action,
            xid: xid.into_inner() as u64,
            lsn: Lsn(lsn),
            commit_lsn: (!streamed).then(|| Lsn((*top).end_lsn)),
            commit_ts: (st.opts.include_timestamp && !streamed)
                .then(|| (*top).xact_time.commit_time),
            streamed,
            subxid,
            seq: Some(seq),
        }
    }
}

/// The relation's cached facts, rebuilt after PostgreSQL invalidated them.
unsafe fn rel_info(st: &mut State, rel: pg_sys::Relation) -> Rc<RelInfo> {
    // SAFETY: an open relation passed to a callback.
    let relid = unsafe { (*rel).rd_id };
    apply_invalidations(&mut st.rels, relid);
    if let Some(r) = st.rels.get(&relid) {
        return r.clone();
    }
    // SAFETY: as above; catalog access is allowed in decoding callbacks.
    let info = Rc::new(unsafe { relation::build(rel, &st.opts, &mut st.types) });
    // Invalidated while it was being built (the build's own catalog access can accept
    // invalidation messages): use it for this change, but do not keep it.
    if !apply_invalidations(&mut st.rels, relid) {
        st.rels.insert(relid, info.clone());
    }
    info
}

/// Deforms `tuple` into `st.values`/`st.nulls`.
unsafe fn deform(
    st: &mut State,
    tuple: *mut pg_sys::ReorderBufferTupleBuf,
    desc: pg_sys::TupleDesc,
    natts: usize,
) {
    st.values.clear();
    st.values.resize(natts, pg_sys::Datum::from(0usize));
    st.nulls.clear();
    st.nulls.resize(natts, true);
    // SAFETY: a decoded tuple of this relation; the arrays have natts entries.
    unsafe {
        pg_sys::heap_deform_tuple(
            &mut (*tuple).tuple,
            desc,
            st.values.as_mut_ptr(),
            st.nulls.as_mut_ptr(),
        )
    };
}

/// Writes `,"<name>":{…}` for the columns at `positions` of the deformed tuple. On-disk TOAST
/// pointers are never read: their positions are collected in `st.toast` instead.
unsafe fn write_columns(
    st: &mut State,
    rel: &RelInfo,
    name: &str,
    positions: impl Iterator<Item = usize>,
) {
    let mut obj = ObjectWriter::open_member(&mut st.buf, name);
    for p in positions {
        let col = &rel.columns[p];
        let isnull = st.nulls[col.index];
        let datum = st.values[col.index];
        // SAFETY: a varlena column's non-null datum points at a varlena.
        if !isnull && col.varlena && unsafe { is_external_ondisk(datum) } {
            st.toast.push(p);
            continue;
        }
        obj.field(&mut st.buf, &col.name_json);
        if isnull {
            st.buf.extend_from_slice(b"null");
        } else {
            // SAFETY: a non-null datum of the column's type, not an on-disk TOAST pointer.
            unsafe { st.types.write(&mut st.buf, &col.enc, datum) };
        }
    }
    obj.close(&mut st.buf);
}

unsafe fn write_change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
    streamed: bool,
) {
    // SAFETY: valid callback arguments throughout.
    unsafe {
        let st = state(ctx);
        let action = match (*change).action {
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT
                if st.opts.actions.insert =>
            {
                Action::Insert
            }
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_UPDATE
                if st.opts.actions.update =>
            {
                Action::Update
            }
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_DELETE
                if st.opts.actions.delete =>
            {
                Action::Delete
            }
            _ => return,
        };
        let cxt = st.change_cxt;
        in_change_cxt(cxt, || {
            let info = rel_info(st, rel);
            if !info.included {
                return;
            }
            if !streamed {
                ensure_begin(ctx, st, txn);
            }
            let tp = (*change).data.tp;
            let head = change_head(st, txn, (*change).txn, action, (*change).lsn, streamed);
            encode::write_head(&mut st.buf, &head);
            encode::write_table_quoted(&mut st.buf, &info.schema_json, &info.table_json);
            encode::write_key(
                &mut st.buf,
                info.key
                    .iter()
                    .map(|&i| info.columns[i].name_json.as_slice()),
            );
            let desc = (*rel).rd_att;
            st.toast.clear();
            if action != Action::Delete && !tp.newtuple.is_null() {
                deform(st, tp.newtuple, desc, info.natts);
                write_columns(st, &info, "columns", 0..info.columns.len());
            }
            // Unchanged TOAST of the new row; collected before the old row is read.
            let toast: Vec<usize> = std::mem::take(&mut st.toast);
            if action != Action::Insert && !tp.oldtuple.is_null() && !info.identity.is_empty() {
                deform(st, tp.oldtuple, desc, info.natts);
                write_columns(st, &info, "identity", info.identity.iter().copied());
            }
            if !toast.is_empty() {
                encode::write_unchanged_toast(
                    &mut st.buf,
                    toast.iter().map(|&i| info.columns[i].name_json.as_slice()),
                );
            }
            if st.opts.include_types {
                st.buf.extend_from_slice(&info.types_json);
            }
            write_origin(st, (*change).origin_id);
            encode::end(&mut st.buf);
            emit(ctx, st, true);
        });
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: forwarded callback arguments.
    unsafe { write_change(ctx, txn, rel, change, false) }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: forwarded callback arguments.
    unsafe { write_change(ctx, txn, rel, change, true) }
}

unsafe fn write_truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: i32,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
    streamed: bool,
) {
    // SAFETY: valid callback arguments throughout.
    unsafe {
        let st = state(ctx);
        if !st.opts.actions.truncate {
            return;
        }
        let cxt = st.change_cxt;
        in_change_cxt(cxt, || {
            let rels: Vec<Rc<RelInfo>> = (0..nrelations.max(0) as usize)
                .map(|i| rel_info(st, *relations.add(i)))
                .filter(|r| r.included)
                .collect();
            if rels.is_empty() {
                return;
            }
            if !streamed {
                ensure_begin(ctx, st, txn);
            }
            let t = (*change).data.truncate;
            // One T record per table, each naming all tables of the statement, so that
            // consumers routing by table see every truncated table.
            let n = rels.len();
            for (i, r) in rels.iter().enumerate() {
                let head = change_head(
                    st,
                    txn,
                    (*change).txn,
                    Action::Truncate,
                    (*change).lsn,
                    streamed,
                );
                encode::write_head(&mut st.buf, &head);
                encode::write_table_quoted(&mut st.buf, &r.schema_json, &r.table_json);
                encode::write_truncate(
                    &mut st.buf,
                    rels.iter()
                        .map(|r| (r.schema_json.as_slice(), r.table_json.as_slice())),
                    t.cascade,
                    t.restart_seqs,
                );
                write_origin(st, (*change).origin_id);
                encode::end(&mut st.buf);
                emit(ctx, st, i + 1 == n);
            }
        });
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: i32,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: forwarded callback arguments.
    unsafe { write_truncate(ctx, txn, nrelations, relations, change, false) }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: i32,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: forwarded callback arguments.
    unsafe { write_truncate(ctx, txn, nrelations, relations, change, true) }
}

#[allow(clippy::too_many_arguments)]
unsafe fn write_message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const std::ffi::c_char,
    size: pg_sys::Size,
    content: *const std::ffi::c_char,
    streamed: bool,
) {
    // SAFETY: valid callback arguments throughout; txn may be null for a non-transactional
    // message outside any transaction.
    unsafe {
        let st = state(ctx);
        let prefix = CStr::from_ptr(prefix).to_bytes();
        let content: &[u8] = if size == 0 || content.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts(content as *const u8, size)
        };
        // A schema change from the extension's event triggers: an `L` record. A message that
        // does not read as one (written by hand, say) falls through as a plain message.
        if transactional
            && !txn.is_null()
            && prefix == saiki_core::record::DDL_PREFIX.as_bytes()
            && write_schema_change(ctx, txn, lsn, content, streamed)
        {
            return;
        }
        if !st.opts.actions.message || !st.opts.message_included(&String::from_utf8_lossy(prefix)) {
            return;
        }
        let cxt = st.change_cxt;
        in_change_cxt(cxt, || {
            let head = if transactional && !txn.is_null() {
                if !streamed {
                    ensure_begin(ctx, st, txn);
                }
                message_head(st, txn, Action::Message, lsn, streamed)
            } else {
                // Not part of a transaction's output: its own LSN is the position to confirm.
                Head {
                    action: Action::Message,
                    xid: if txn.is_null() {
                        0
                    } else {
                        (*top_txn(txn)).xid.into_inner() as u64
                    },
                    lsn: Lsn(lsn),
                    commit_lsn: Some(Lsn(lsn)),
                    commit_ts: None,
                    streamed: false,
                    subxid: None,
                    seq: None,
                }
            };
            encode::write_head(&mut st.buf, &head);
            encode::write_message(&mut st.buf, prefix, content, transactional);
            if !txn.is_null() {
                write_origin(st, (*txn).origin_id);
            }
            encode::end(&mut st.buf);
            emit(ctx, st, true);
            if !transactional {
                // Not tied to a commit: the consumer gets it now (a heartbeat must not wait).
                flush_batch(ctx, st);
            }
        });
    }
}

/// Writes an `L` record for a DDL message, unless its table or `ddl` are filtered out.
/// Returns false (nothing written) if the message does not read as a schema change.
unsafe fn write_schema_change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    lsn: pg_sys::XLogRecPtr,
    content: &[u8],
    streamed: bool,
) -> bool {
    // SAFETY: valid callback arguments throughout; txn is not null (checked by the caller).
    unsafe {
        let st = state(ctx);
        let cxt = st.change_cxt;
        in_change_cxt(cxt, || {
            // Encoded into a side buffer first: the table filter needs the names inside.
            let mut tail = Vec::new();
            let Some((schema, table)) = encode::write_schema_change(&mut tail, content) else {
                return false;
            };
            if !st.opts.actions.ddl || !st.opts.table_included(&schema, &table) {
                return true;
            }
            if !streamed {
                ensure_begin(ctx, st, txn);
            }
            let head = message_head(st, txn, Action::SchemaChange, lsn, streamed);
            encode::write_head(&mut st.buf, &head);
            st.buf.extend_from_slice(&tail);
            write_origin(st, (*txn).origin_id);
            encode::end(&mut st.buf);
            emit(ctx, st, true);
            true
        })
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const std::ffi::c_char,
    size: pg_sys::Size,
    content: *const std::ffi::c_char,
) {
    // SAFETY: forwarded callback arguments.
    unsafe { write_message(ctx, txn, lsn, transactional, prefix, size, content, false) }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const std::ffi::c_char,
    size: pg_sys::Size,
    content: *const std::ffi::c_char,
) {
    // SAFETY: forwarded callback arguments.
    unsafe { write_message(ctx, txn, lsn, transactional, prefix, size, content, true) }
}

#[pg_guard]
unsafe extern "C-unwind" fn filter_by_origin(
    ctx: *mut pg_sys::LogicalDecodingContext,
    origin_id: pg_sys::RepOriginId,
) -> bool {
    // SAFETY: valid callback arguments.
    let st = unsafe { state(ctx) };
    if st.opts.filter_origins.is_empty() || origin_id == 0 {
        return false;
    }
    // SAFETY: catalog lookup inside a decoding callback.
    match unsafe { origin_name(st, origin_id) } {
        Some(name) => st.opts.origin_filtered(&String::from_utf8_lossy(&name)),
        None => st.opts.filter_origins.iter().any(|o| o == "*"),
    }
}

/// Writes a stream marker (`S`, `E`, `A`) or the commit of a streamed transaction.
unsafe fn stream_marker(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    action: Action,
    lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: valid callback arguments throughout.
    unsafe {
        let st = state(ctx);
        let top = top_txn(txn);
        let xid = (*top).xid;
        let subxid = (top != txn).then(|| (*txn).xid.into_inner() as u64);
        let commit = action == Action::Commit;
        if commit || (action == Action::StreamAbort && subxid.is_none()) {
            st.stream_seq.remove(&xid);
        }
        let cxt = st.change_cxt;
        in_change_cxt(cxt, || {
            encode::write_head(
                &mut st.buf,
                &Head {
                    action,
                    xid: xid.into_inner() as u64,
                    lsn: Lsn(lsn),
                    commit_lsn: commit.then(|| Lsn((*top).end_lsn)),
                    commit_ts: commit.then(|| (*top).xact_time.commit_time),
                    streamed: true,
                    subxid,
                    seq: None,
                },
            );
            encode::end(&mut st.buf);
            emit(ctx, st, true);
            if action != Action::StreamStart {
                // A block ends (E), or the transaction does (A of the top level, C).
                flush_batch(ctx, st);
            }
        });
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_start(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: forwarded callback arguments.
    unsafe { stream_marker(ctx, txn, Action::StreamStart, (*txn).first_lsn) }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_stop(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: forwarded callback arguments; the block ends at its last change.
    unsafe {
        let lsn = state(ctx).last_stream_lsn;
        stream_marker(ctx, txn, Action::StreamStop, lsn)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_abort(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    abort_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: forwarded callback arguments.
    unsafe { stream_marker(ctx, txn, Action::StreamAbort, abort_lsn) }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: forwarded callback arguments.
    unsafe { stream_marker(ctx, txn, Action::Commit, commit_lsn) }
}
