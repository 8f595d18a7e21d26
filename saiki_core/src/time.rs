//! PostgreSQL timestamps (microseconds since 2000-01-01 00:00:00 UTC) as RFC 3339 text.

/// Microseconds since the Unix epoch, now (0 if the clock is before 1970): heartbeat contents,
/// standby status updates, snapshot ids, freshness.
pub fn unix_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (unquoted) for microseconds since the Unix epoch.
pub fn format_unix_micros(unix_micros: i64) -> String {
    let mut b = Vec::with_capacity(29);
    write_timestamptz(&mut b, unix_micros - PG_EPOCH_UNIX_SECS * 1_000_000);
    String::from_utf8_lossy(&b[1..b.len() - 1]).into_owned()
}

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

/// Parses what [`write_timestamptz`] writes (unquoted: `YYYY-MM-DDTHH:MM:SS.ffffffZ`, years
/// 0000-9999) back to microseconds since the Unix epoch. `None` for anything else, including
/// the infinities: a reader that wants a point in time has none there.
pub fn parse_rfc3339_utc_micros(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 27 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || b[19] != b'.' || b[26] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        b[r].iter().try_fold(0i64, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, us) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..26)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    let days = days_from_civil(y, m as u32, d as u32);
    if civil_from_days(days) != (y, m as u32, d as u32) {
        return None; // 31 February and the like
    }
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000 + us)
}

/// A proleptic Gregorian date to days since 1970-01-01: the inverse of [`civil_from_days`],
/// after the same source.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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

    #[test]
    fn unix_micros_format_and_parse_back() {
        let t = 1_764_576_000_123_456; // 2025-12-01T08:00:00.123456Z
        assert_eq!(format_unix_micros(t), "2025-12-01T08:00:00.123456Z");
        assert_eq!(parse_rfc3339_utc_micros(&format_unix_micros(t)), Some(t));
    }

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

    #[test]
    fn parsing_reads_back_what_was_written() {
        for v in [
            0i64,
            -1,
            1,
            123_456_789_012_345,
            -63_000_000_000_000_000 / 1000,
            820_000_000_000_000,
        ] {
            let text = ts(v);
            let unix = parse_rfc3339_utc_micros(text.trim_matches('"')).unwrap();
            assert_eq!(unix, v + PG_EPOCH_UNIX_SECS * 1_000_000, "{text}");
        }
    }

    #[test]
    fn parsing_refuses_what_is_not_a_written_timestamp() {
        for bad in [
            "infinity",
            "2026-11-27 05:19:58.123456Z",
            "2026-11-27T05:19:58Z",
            "2026-02-30T00:00:00.000000Z",
            "2026-13-01T00:00:00.000000Z",
            "2026-11-27T24:00:00.000000Z",
            "2026-11-27T05:19:58.12345xZ",
        ] {
            assert_eq!(parse_rfc3339_utc_micros(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_timestamp_of_years_0_to_9999_round_trips(v in -63_082_281_600_000_000i64..252_455_615_999_999_999) {
            let text = ts(v);
            proptest::prop_assert_eq!(
                parse_rfc3339_utc_micros(text.trim_matches('"')),
                Some(v + PG_EPOCH_UNIX_SECS * 1_000_000)
            );
        }
    }
}
