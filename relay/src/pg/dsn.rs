//! PostgreSQL connection strings: URIs (`postgres://user:pass@host:port/db?k=v`) and
//! key=value strings (`host=… port=… user=… dbname=…`). The password never appears in
//! `Display` or `Debug`, so a DSN can be logged.

use std::collections::BTreeMap;

#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Dsn {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
    pub(crate) password: Option<String>,
    pub(crate) dbname: String,
    pub(crate) tls: crate::pg::tls::TlsOptions,
    pub(crate) application_name: String,
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pw = if self.password.is_some() { ":***" } else { "" };
        write!(
            f,
            "postgres://{}{pw}@{}:{}/{}",
            self.user, self.host, self.port, self.dbname
        )
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("truncated %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad %-escape %{hex}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 after %-decoding".to_string())
}

impl Dsn {
    /// Parses a URI or key=value DSN. Unset parts take libpq's defaults (host localhost,
    /// port 5432, user from $USER, dbname = user) and `PGPASSWORD` supplies a missing password.
    pub(crate) fn parse(s: &str) -> Result<Dsn, String> {
        let s = s.trim();
        let mut kv: BTreeMap<String, String> = BTreeMap::new();
        if let Some(rest) = s
            .strip_prefix("postgres://")
            .or_else(|| s.strip_prefix("postgresql://"))
        {
            let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
            let (auth_host, db) = main.split_once('/').unwrap_or((main, ""));
            let (auth, hostport) = match auth_host.rsplit_once('@') {
                Some((a, h)) => (Some(a), h),
                None => (None, auth_host),
            };
            if let Some(a) = auth {
                let (u, p) = match a.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (a, None),
                };
                if !u.is_empty() {
                    kv.insert("user".into(), percent_decode(u)?);
                }
                if let Some(p) = p {
                    kv.insert("password".into(), percent_decode(p)?);
                }
            }
            if !hostport.is_empty() {
                let (h, p) = match hostport.rsplit_once(':') {
                    Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (h, Some(p)),
                    _ => (hostport, None),
                };
                kv.insert("host".into(), h.trim_matches(['[', ']']).to_string());
                if let Some(p) = p {
                    kv.insert("port".into(), p.to_string());
                }
            }
            if !db.is_empty() {
                kv.insert("dbname".into(), percent_decode(db)?);
            }
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("query parameter '{pair}' has no value"))?;
                kv.insert(k.to_string(), percent_decode(v)?);
            }
        } else {
            for part in split_kv(s)? {
                let (k, v) = part
                    .split_once('=')
                    .ok_or_else(|| format!("'{part}' is not key=value"))?;
                kv.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
        let user = kv
            .remove("user")
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into());
        let port = match kv.remove("port") {
            Some(p) => p
                .parse()
                .map_err(|_| format!("port '{p}' is not a number"))?,
            None => 5432,
        };
        let dsn = Dsn {
            host: kv.remove("host").unwrap_or_else(|| "localhost".into()),
            port,
            dbname: kv.remove("dbname").unwrap_or_else(|| user.clone()),
            password: kv
                .remove("password")
                .or_else(|| std::env::var("PGPASSWORD").ok()),
            tls: crate::pg::tls::TlsOptions {
                mode: crate::pg::tls::SslMode::parse(
                    kv.remove("sslmode").as_deref().unwrap_or("prefer"),
                )?,
                rootcert: kv.remove("sslrootcert").map(Into::into),
                cert: kv.remove("sslcert").map(Into::into),
                key: kv.remove("sslkey").map(Into::into),
            },
            application_name: kv
                .remove("application_name")
                .unwrap_or_else(|| "saiki-relay".into()),
            user,
        };
        kv.remove("connect_timeout");
        if let Some(k) = kv.keys().next() {
            return Err(format!("unsupported connection parameter '{k}'"));
        }
        Ok(dsn)
    }
}

/// Splits `k=v k2='v 2'` respecting single quotes and backslash escapes, as libpq does.
fn split_kv(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut in_quote = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.push(chars.next().ok_or("trailing backslash")?),
            '\'' => in_quote = !in_quote,
            c if c.is_whitespace() && !in_quote => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if in_quote {
        return Err("unterminated quote".into());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    // `k = v` with blanks around '=': glue them back.
    let mut glued: Vec<String> = Vec::new();
    for p in out {
        match glued.last_mut() {
            Some(last) if last.ends_with('=') || p.starts_with('=') => last.push_str(&p),
            _ => glued.push(p),
        }
    }
    Ok(glued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_and_key_values_parse_alike() {
        let a =
            Dsn::parse("postgres://saiki:s%40cret@127.0.0.1:5433/shop?application_name=x").unwrap();
        let b = Dsn::parse(
            "host=127.0.0.1 port=5433 user=saiki password='s@cret' dbname=shop application_name=x",
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.password.as_deref(), Some("s@cret"));
    }

    #[test]
    fn the_password_is_never_displayed() {
        let d = Dsn::parse("postgres://u:topsecret@h/db").unwrap();
        assert!(!format!("{d} {d:?}").contains("topsecret"));
    }

    #[test]
    fn bad_dsns_say_what_is_wrong() {
        assert!(Dsn::parse("postgres://h:notaport/db")
            .unwrap_err()
            .contains("port"));
        assert!(Dsn::parse("host=h bogus=1").unwrap_err().contains("bogus"));
        assert!(Dsn::parse("postgres://h/db?sslmode=verify_full")
            .unwrap_err()
            .contains("verify-full"));
    }

    #[test]
    fn tls_parameters_parse_as_libpq_names_them() {
        let d = Dsn::parse(
            "postgres://h/db?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(d.tls.mode, crate::pg::tls::SslMode::VerifyFull);
        assert_eq!(
            d.tls.rootcert.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(d.tls.key.as_deref(), Some(std::path::Path::new("/k.pem")));
        assert_eq!(
            Dsn::parse("host=h").unwrap().tls.mode,
            crate::pg::tls::SslMode::Prefer
        );
    }
}
