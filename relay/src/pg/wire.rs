//! The PostgreSQL wire protocol, as much as a logical replication client needs: frontend
//! messages, backend message framing and parsing (including `W`, CopyBothResponse, which the
//! `postgres-protocol` crate does not parse), and the replication sub-messages inside CopyData.
//! Pure: no I/O, unit-tested.

use bytes::{Buf, BufMut, BytesMut};
use saiki_core::Lsn;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A framing or content error in what the server sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol error: {0}")]
pub struct ProtocolError(pub(crate) String);

// ---------------------------------------------------------------- frontend

/// StartupMessage, protocol 3.0, with `(name, value)` parameters.
pub(crate) fn startup(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let start = buf.len();
    buf.put_i32(0);
    buf.put_i32(196_608); // 3.0
    for (k, v) in params {
        put_cstr(buf, k);
        put_cstr(buf, v);
    }
    buf.put_u8(0);
    let len = (buf.len() - start) as i32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// A regular message: tag, length, body written by `body`.
fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let start = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - start) as i32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// Query ('Q'): a simple query.
pub(crate) fn query(buf: &mut BytesMut, sql: &str) {
    message(buf, b'Q', |b| put_cstr(b, sql));
}

/// PasswordMessage ('p') with a cleartext or MD5 password.
pub(crate) fn password(buf: &mut BytesMut, password: &[u8]) {
    message(buf, b'p', |b| {
        b.put_slice(password);
        b.put_u8(0);
    });
}

/// SASLInitialResponse ('p').
pub(crate) fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    message(buf, b'p', |b| {
        put_cstr(b, mechanism);
        b.put_i32(data.len() as i32);
        b.put_slice(data);
    });
}

/// SASLResponse ('p').
pub(crate) fn sasl_response(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'p', |b| b.put_slice(data));
}

/// CopyData ('d') carrying a Standby Status Update ('r').
/// `flush` is the position whose changes the consumer has made durable: the slot's
/// confirmed_flush_lsn moves to it.
pub(crate) fn standby_status_update(
    buf: &mut BytesMut,
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now_unix_micros: i64,
    reply: bool,
) {
    message(buf, b'd', |b| {
        b.put_u8(b'r');
        b.put_u64(write.0);
        b.put_u64(flush.0);
        b.put_u64(apply.0);
        b.put_i64(now_unix_micros - PG_EPOCH_OFFSET_MICROS);
        b.put_u8(reply as u8);
    });
}

/// CopyDone ('c').
pub(crate) fn copy_done(buf: &mut BytesMut) {
    message(buf, b'c', |_| {});
}

// ---------------------------------------------------------------- backend

/// A backend message the client acts on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Backend {
    Authentication(Auth),
    ParameterStatus,
    KeyData,
    ReadyForQuery,
    Error(ServerError),
    Notice(ServerError),
    RowDescription(Vec<String>),
    DataRow(Vec<Option<String>>),
    CommandComplete,
    EmptyQuery,
    CopyBothResponse,
    CopyOutResponse,
    CopyData(bytes::Bytes),
    CopyDone,
    Other(u8),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Auth {
    Ok,
    Cleartext,
    Md5 { salt: [u8; 4] },
    Sasl { mechanisms: Vec<String> },
    SaslContinue(bytes::Bytes),
    SaslFinal(bytes::Bytes),
    Unsupported(i32),
}

/// The fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServerError {
    pub(crate) severity: String,
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) detail: Option<String>,
    pub(crate) hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

/// Takes one complete message off the front of `buf`, or `None` if more bytes are needed.
pub(crate) fn parse_backend(buf: &mut BytesMut) -> Result<Option<Backend>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError(format!(
            "message '{}' with length {len}",
            tag as char
        )));
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut msg = buf.split_to(total).freeze();
    msg.advance(5);
    let body = msg;
    let bad = |what: &str| ProtocolError(format!("malformed '{}' message: {what}", tag as char));
    Ok(Some(match tag {
        b'R' => {
            let mut b = body.clone();
            if b.remaining() < 4 {
                return Err(bad("short"));
            }
            match b.get_i32() {
                0 => Backend::Authentication(Auth::Ok),
                3 => Backend::Authentication(Auth::Cleartext),
                5 => {
                    if b.remaining() < 4 {
                        return Err(bad("no salt"));
                    }
                    let mut salt = [0u8; 4];
                    b.copy_to_slice(&mut salt);
                    Backend::Authentication(Auth::Md5 { salt })
                }
                10 => {
                    let mechanisms = b
                        .chunk()
                        .split(|c| *c == 0)
                        .filter(|s| !s.is_empty())
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect();
                    Backend::Authentication(Auth::Sasl { mechanisms })
                }
                11 => Backend::Authentication(Auth::SaslContinue(b.copy_to_bytes(b.remaining()))),
                12 => Backend::Authentication(Auth::SaslFinal(b.copy_to_bytes(b.remaining()))),
                other => Backend::Authentication(Auth::Unsupported(other)),
            }
        }
        b'S' => Backend::ParameterStatus,
        b'K' => Backend::KeyData,
        b'Z' => Backend::ReadyForQuery,
        b'E' => Backend::Error(parse_fields(&body)),
        b'N' => Backend::Notice(parse_fields(&body)),
        b'T' => {
            let mut b = body.clone();
            if b.remaining() < 2 {
                return Err(bad("short"));
            }
            let n = b.get_i16().max(0) as usize;
            let mut names = Vec::with_capacity(n);
            for _ in 0..n {
                let name = take_cstr(&mut b).ok_or_else(|| bad("field name"))?;
                if b.remaining() < 18 {
                    return Err(bad("field description"));
                }
                b.advance(18);
                names.push(name);
            }
            Backend::RowDescription(names)
        }
        b'D' => {
            let mut b = body.clone();
            if b.remaining() < 2 {
                return Err(bad("short"));
            }
            let n = b.get_i16().max(0) as usize;
            let mut values = Vec::with_capacity(n);
            for _ in 0..n {
                if b.remaining() < 4 {
                    return Err(bad("value length"));
                }
                let l = b.get_i32();
                if l < 0 {
                    values.push(None);
                } else {
                    let l = l as usize;
                    if b.remaining() < l {
                        return Err(bad("value"));
                    }
                    values.push(Some(String::from_utf8_lossy(&b.chunk()[..l]).into_owned()));
                    b.advance(l);
                }
            }
            Backend::DataRow(values)
        }
        b'C' => Backend::CommandComplete,
        b'I' => Backend::EmptyQuery,
        b'W' => Backend::CopyBothResponse,
        b'H' => Backend::CopyOutResponse,
        b'd' => Backend::CopyData(body),
        b'c' => Backend::CopyDone,
        other => Backend::Other(other),
    }))
}

fn take_cstr(b: &mut bytes::Bytes) -> Option<String> {
    let end = b.iter().position(|c| *c == 0)?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Some(s)
}

fn parse_fields(body: &[u8]) -> ServerError {
    let mut e = ServerError::default();
    for field in body.split(|c| *c == 0) {
        if field.is_empty() {
            continue;
        }
        let v = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'V' => e.severity = v,
            b'S' if e.severity.is_empty() => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    e
}

/// What a CopyData message of the replication stream carries.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Replication {
    /// XLogData: plugin output starting at `wal_start`.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        data: bytes::Bytes,
    },
    /// Primary keepalive: the server's WAL end, and whether it wants a reply now.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// Parses the payload of a CopyData message of the replication stream.
pub(crate) fn parse_replication(mut body: bytes::Bytes) -> Result<Replication, ProtocolError> {
    if body.is_empty() {
        return Err(ProtocolError("empty CopyData".into()));
    }
    match body.get_u8() {
        b'w' => {
            if body.remaining() < 24 {
                return Err(ProtocolError("short XLogData header".into()));
            }
            let wal_start = Lsn(body.get_u64());
            let wal_end = Lsn(body.get_u64());
            let _server_time = body.get_i64();
            Ok(Replication::XLogData {
                wal_start,
                wal_end,
                data: body,
            })
        }
        b'k' => {
            if body.remaining() < 17 {
                return Err(ProtocolError("short keepalive".into()));
            }
            let wal_end = Lsn(body.get_u64());
            let _server_time = body.get_i64();
            let reply_requested = body.get_u8() != 0;
            Ok(Replication::Keepalive {
                wal_end,
                reply_requested,
            })
        }
        other => Err(ProtocolError(format!(
            "unknown replication message '{}'",
            other as char
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(tag: u8, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(body);
        b
    }

    #[test]
    fn startup_message_has_its_length_and_version() {
        let mut b = BytesMut::new();
        startup(&mut b, &[("user", "saiki"), ("replication", "database")]);
        assert_eq!(
            i32::from_be_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(&b[4..8], &196_608i32.to_be_bytes());
        assert!(b.ends_with(b"replication\0database\0\0"));
    }

    #[test]
    fn copy_both_response_is_parsed_by_hand() {
        let mut b = frame(b'W', &[0, 0, 0]);
        assert_eq!(
            parse_backend(&mut b).unwrap(),
            Some(Backend::CopyBothResponse)
        );
        assert!(b.is_empty());
    }

    #[test]
    fn partial_messages_wait_for_more_bytes() {
        let full = frame(b'Z', b"I");
        let mut b = BytesMut::from(&full[..3]);
        assert_eq!(parse_backend(&mut b).unwrap(), None);
        b.extend_from_slice(&full[3..]);
        assert_eq!(parse_backend(&mut b).unwrap(), Some(Backend::ReadyForQuery));
    }

    #[test]
    fn error_responses_keep_code_message_and_hint() {
        let mut b = frame(
            b'E',
            b"SERROR\0VERROR\0C42704\0Mreplication slot \"x\" does not exist\0Hcreate it\0\0",
        );
        match parse_backend(&mut b).unwrap() {
            Some(Backend::Error(e)) => {
                assert_eq!(e.code, "42704");
                assert_eq!(e.hint.as_deref(), Some("create it"));
                assert!(e.to_string().contains("does not exist"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn xlogdata_and_keepalive_parse() {
        let mut body = BytesMut::new();
        body.put_u8(b'w');
        body.put_u64(0x10);
        body.put_u64(0x20);
        body.put_i64(0);
        body.put_slice(b"{\"action\":\"B\"}");
        match parse_replication(body.freeze()).unwrap() {
            Replication::XLogData {
                wal_start,
                wal_end,
                data,
            } => {
                assert_eq!((wal_start, wal_end), (Lsn(0x10), Lsn(0x20)));
                assert_eq!(&data[..], b"{\"action\":\"B\"}");
            }
            other => panic!("{other:?}"),
        }
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(99);
        k.put_i64(0);
        k.put_u8(1);
        assert_eq!(
            parse_replication(k.freeze()).unwrap(),
            Replication::Keepalive {
                wal_end: Lsn(99),
                reply_requested: true
            }
        );
        assert!(parse_replication(bytes::Bytes::from_static(b"w\0")).is_err());
    }

    #[test]
    fn standby_status_update_layout() {
        let mut b = BytesMut::new();
        standby_status_update(
            &mut b,
            Lsn(1),
            Lsn(2),
            Lsn(3),
            PG_EPOCH_OFFSET_MICROS + 5,
            true,
        );
        assert_eq!(b[0], b'd');
        assert_eq!(
            i32::from_be_bytes(b[1..5].try_into().unwrap()),
            4 + 1 + 8 * 4 + 1
        );
        assert_eq!(b[5], b'r');
        assert_eq!(u64::from_be_bytes(b[14..22].try_into().unwrap()), 2);
        assert_eq!(i64::from_be_bytes(b[30..38].try_into().unwrap()), 5);
        assert_eq!(b[38], 1);
    }

    proptest! {
        #[test]
        fn any_split_of_a_message_stream_parses_the_same(cut in 0usize..40) {
            let mut all = frame(b'Z', b"I");
            all.extend_from_slice(&frame(b'C', b"SELECT 1\0"));
            all.extend_from_slice(&frame(b'd', b"k0000000000000000x"));
            let cut = cut.min(all.len());
            let mut b = BytesMut::from(&all[..cut]);
            let mut got = Vec::new();
            while let Some(m) = parse_backend(&mut b).unwrap() { got.push(m); }
            b.extend_from_slice(&all[cut..]);
            while let Some(m) = parse_backend(&mut b).unwrap() { got.push(m); }
            prop_assert_eq!(got.len(), 3);
            prop_assert!(b.is_empty());
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = parse_backend(&mut b) {}
            let _ = parse_replication(bytes::Bytes::from(bytes));
        }
    }
}
