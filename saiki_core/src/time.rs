//! PostgreSQL timestamps (microseconds since 2000-01-01 00:00:00 UTC) as RFC 3339 text.

/// Seconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Appends `"YYYY-MM-DDTHH:MM:SS.ffffffZ"` (quoted) for a `TimestampTz`.
///
/// PostgreSQL's `-infinity`/`infinity` (i64::MIN / i64::MAX) are written as those strings.
pub fn write_timestamptz(buf: &mut Vec<u8>, pg_micros: i64) {
    if pg_micros == i64::MIN {
        buf.extend_from_slice(b"\"-infinity\"");
        return;
    }
    if pg_micros == i64::MAX {
        buf.extend_from_slice(b"\"infinity\"");
        return;
    }
    let unix_micros = pg_micros as i128 + PG_EPOCH_UNIX_SECS as i128 * 1_000_000;
    let days = unix_micros.div_euclid(MICROS_PER_DAY as i128) as i64;
    let rem = unix_micros.rem_euclid(MICROS_PER_DAY as i128) as i64;
    let (y, m, d) = civil_from_days(days);
    let secs = rem / 1_000_000;
    let micros = rem % 1_000_000;
    buf.push(b'"');
    if y < 0 {
        buf.push(b'-');
    }
    pad(buf, y.unsigned_abs(), 4);
    buf.push(b'-');
    pad(buf, m as u64, 2);
    buf.push(b'-');
    pad(buf, d as u64, 2);
    buf.push(b'T');
    pad(buf, (secs / 3600) as u64, 2);
    buf.push(b':');
    pad(buf, (secs / 60 % 60) as u64, 2);
    buf.push(b':');
    pad(buf, (secs % 60) as u64, 2);
    buf.push(b'.');
    pad(buf, micros as u64, 6);
    buf.extend_from_slice(b"Z\"");
}

fn pad(buf: &mut Vec<u8>, v: u64, width: usize) {
    let mut tmp = [b'0'; 20];
    let mut i = tmp.len();
    let mut v = v;
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let start = i.min(tmp.len() - width);
    buf.extend_from_slice(&tmp[start..]);
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
/// The algorithm is Howard Hinnant's `civil_from_days`
/// (<https://howardhinnant.github.io/date_algorithms.html>), rewritten here.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(v: i64) -> String {
        let mut b = Vec::new();
        write_timestamptz(&mut b, v);
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn timestamps_print_as_rfc3339_utc_with_microseconds() {
        assert_eq!(ts(0), "\"2000-01-01T00:00:00.000000Z\"");
        assert_eq!(ts(-1), "\"1999-12-31T23:59:59.999999Z\"");
        // 2026-11-27 05:19:58.123456 UTC
        let unix = 1_795_756_798i64;
        assert_eq!(
            ts((unix - PG_EPOCH_UNIX_SECS) * 1_000_000 + 123_456),
            "\"2026-11-27T05:19:58.123456Z\""
        );
        assert_eq!(ts(i64::MAX), "\"infinity\"");
        assert_eq!(ts(i64::MIN), "\"-infinity\"");
        // leap day
        let unix = 951_782_400i64; // 2000-02-29
        assert_eq!(
            ts((unix - PG_EPOCH_UNIX_SECS) * 1_000_000),
            "\"2000-02-29T00:00:00.000000Z\""
        );
    }
}
