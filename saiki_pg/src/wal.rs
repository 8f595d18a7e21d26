//! Writing to the WAL from the extension: logical decoding messages (the heartbeat and the
//! snapshot watermarks).

use pgrx::pg_sys;

unsafe extern "C-unwind" {
    // replication/message.h (PostgreSQL 15), not in pgrx's bindings.
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;
}

/// Writes a logical decoding message (what `pg_logical_emit_message` writes) and returns its
/// end LSN: the heartbeat and the snapshot watermarks.
pub fn log_logical_message(
    prefix: &std::ffi::CStr,
    content: &[u8],
    transactional: bool,
) -> pg_sys::XLogRecPtr {
    // SAFETY: valid C string and length for the call's duration; the call may raise an ERROR
    // (longjmp), guarded as pg_sys calls are.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            LogLogicalMessage(
                prefix.as_ptr(),
                content.as_ptr() as *const std::ffi::c_char,
                content.len(),
                transactional,
            )
        })
    }
}
