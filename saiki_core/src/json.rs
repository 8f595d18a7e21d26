//! Low-level JSON writing into a byte buffer: strings, numbers as PostgreSQL prints them,
//! embedded JSON documents. The plugin calls these on its hot path, so nothing here allocates
//! beyond growing the caller's buffer.
//!
//! Bytes are written as they come: text in a UTF-8 database gives UTF-8 JSON. Only the bytes
//! JSON forbids inside a string (`"`, `\` and controls below 0x20) are escaped.

/// For each byte: 0 = copy, otherwise the escape character (`u` means `\u00XX`).
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0A] = b'n';
    t[0x0C] = b'f';
    t[0x0D] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Appends `s` as a JSON string literal, quotes included.
#[inline]
pub fn write_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.reserve(s.len() + 2);
    buf.push(b'"');
    write_str_body(buf, s);
    buf.push(b'"');
}

/// Appends the escaped body of a JSON string, without the quotes.
#[inline]
pub fn write_str_body(buf: &mut Vec<u8>, s: &[u8]) {
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc = ESCAPE[b as usize];
        if esc == 0 {
            continue;
        }
        buf.extend_from_slice(&s[start..i]);
        start = i + 1;
        if esc == b'u' {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xF) as usize],
            ]);
        } else {
            buf.extend_from_slice(&[b'\\', esc]);
        }
    }
    buf.extend_from_slice(&s[start..]);
}

/// Whether `s` is a number by JSON's grammar
/// (`-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`).
///
/// PostgreSQL prints `NaN`, `Infinity`, `-Infinity` for floats and numerics: those are not.
pub fn is_json_number(s: &[u8]) -> bool {
    let mut i = 0;
    let n = s.len();
    if i < n && s[i] == b'-' {
        i += 1;
    }
    if i >= n {
        return false;
    }
    if s[i] == b'0' {
        i += 1;
    } else if s[i].is_ascii_digit() {
        while i < n && s[i].is_ascii_digit() {
            i += 1;
        }
    } else {
        return false;
    }
    if i < n && s[i] == b'.' {
        i += 1;
        let start = i;
        while i < n && s[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    if i < n && (s[i] == b'e' || s[i] == b'E') {
        i += 1;
        if i < n && (s[i] == b'+' || s[i] == b'-') {
            i += 1;
        }
        let start = i;
        while i < n && s[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    i == n
}

/// Appends a number's text output: bare when it is a JSON number and `quote` is false,
/// otherwise as a string (`"NaN"`, `"Infinity"`, or any number the caller wants quoted).
#[inline]
pub fn write_number_text(buf: &mut Vec<u8>, text: &[u8], quote: bool) {
    if !quote && is_json_number(text) {
        buf.extend_from_slice(text);
    } else {
        write_str(buf, text);
    }
}

/// Appends an integer.
#[inline]
pub fn write_i64(buf: &mut Vec<u8>, v: i64, quote: bool) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    let neg = v < 0;
    let mut u = v.unsigned_abs();
    loop {
        i -= 1;
        tmp[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    if quote {
        buf.push(b'"');
    }
    if neg {
        buf.push(b'-');
    }
    buf.extend_from_slice(&tmp[i..]);
    if quote {
        buf.push(b'"');
    }
}

/// Appends an unsigned integer, unquoted.
#[inline]
pub fn write_u64(buf: &mut Vec<u8>, v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    let mut u = v;
    loop {
        i -= 1;
        tmp[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

/// Appends a JSON document given as text (a `json` or `jsonb` value's output) with the
/// whitespace between tokens removed, so that a record stays on one line. Bytes inside
/// strings are copied untouched. The input is trusted to be JSON (PostgreSQL validated it on
/// input); if it is not, the bytes are still copied, never dropped.
pub fn write_json_compact(buf: &mut Vec<u8>, text: &[u8]) {
    // Fast path: no whitespace outside strings is the common case for jsonb output only when
    // there is no whitespace at all; check cheaply for any whitespace byte first.
    if !text
        .iter()
        .any(|&b| matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
    {
        buf.extend_from_slice(text);
        return;
    }
    buf.reserve(text.len());
    let mut in_str = false;
    let mut escaped = false;
    for &b in text {
        if in_str {
            buf.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else {
            match b {
                b' ' | b'\n' | b'\r' | b'\t' => {}
                b'"' => {
                    in_str = true;
                    buf.push(b);
                }
                _ => buf.push(b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(v: &[u8]) -> String {
        let mut b = Vec::new();
        write_str(&mut b, v);
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn strings_escape_quotes_backslashes_and_controls() {
        assert_eq!(s(b"plain"), r#""plain""#);
        assert_eq!(s(b"a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(s(b"\n\t\r\x08\x0c\x01\x1f"), r#""\n\t\r\b\f\u0001\u001f""#);
        assert_eq!(s("żółw 🐢".as_bytes()), "\"żółw 🐢\"");
    }

    #[test]
    fn postgres_number_texts_are_classified() {
        for ok in [
            "0",
            "-0",
            "1",
            "-12.50",
            "1e+20",
            "1.5e-07",
            "123456789012345678901234567890.5",
        ] {
            assert!(is_json_number(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "NaN",
            "Infinity",
            "-Infinity",
            "",
            "-",
            "01",
            "1.",
            ".5",
            "1e",
            "+1",
            "1 ",
        ] {
            assert!(!is_json_number(bad.as_bytes()), "{bad}");
        }
        let mut b = Vec::new();
        write_number_text(&mut b, b"NaN", false);
        write_number_text(&mut b, b"1.5", false);
        write_number_text(&mut b, b"1.5", true);
        assert_eq!(b, br#""NaN"1.5"1.5""#);
    }

    #[test]
    fn json_documents_are_compacted_outside_strings_only() {
        let mut b = Vec::new();
        write_json_compact(&mut b, b"{ \"a b\" : [1, 2,\n 3], \"c\":\"x\\\" y\" }");
        assert_eq!(b, br#"{"a b":[1,2,3],"c":"x\" y"}"#);
    }

    proptest! {
        #[test]
        fn any_string_round_trips_through_serde(v in any::<String>()) {
            let out = s(v.as_bytes());
            let back: String = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(back, v);
        }

        #[test]
        fn integers_print_like_std(v in any::<i64>(), u in any::<u64>()) {
            let mut b = Vec::new();
            write_i64(&mut b, v, false);
            prop_assert_eq!(String::from_utf8(b).unwrap(), v.to_string());
            let mut b = Vec::new();
            write_i64(&mut b, v, true);
            prop_assert_eq!(String::from_utf8(b).unwrap(), format!("\"{v}\""));
            let mut b = Vec::new();
            write_u64(&mut b, u);
            prop_assert_eq!(String::from_utf8(b).unwrap(), u.to_string());
        }

        #[test]
        fn float_texts_that_are_finite_are_json_numbers(f in any::<f64>()) {
            let t = format!("{f:e}");
            let parsed_ok = serde_json::from_str::<serde_json::Value>(&t).is_ok();
            prop_assert_eq!(is_json_number(t.as_bytes()), parsed_ok && f.is_finite());
        }

        #[test]
        fn compacted_json_means_the_same(v in json_value()) {
            let pretty = serde_json::to_string_pretty(&v).unwrap();
            let mut b = Vec::new();
            write_json_compact(&mut b, pretty.as_bytes());
            let back: serde_json::Value = serde_json::from_slice(&b).unwrap();
            prop_assert_eq!(back, v);
            prop_assert!(!b.contains(&b'\n'));
        }
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| Value::Number(i.into())),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((".*", inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }
}
