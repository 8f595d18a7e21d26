//! PostgreSQL connection strings: URIs (`postgres://user:pass@host:port/db?k=v`) and
//! key=value strings (`host=… port=… user=… dbname=…`). The password never appears in
//! `Display` or `Debug`, so a DSN can be logged.

use std::collections::BTreeMap;

#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Dsn {
    /// The first host (where a single-host connection goes).
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Every host with its port, in the DSN's order (`host=a,b port=5432,5433`, or
    /// `postgres://a:5432,b:5433/db`), the first one included: a connection tries them in
    /// turn, as libpq does.
    pub(crate) hosts: Vec<(String, u16)>,
    /// `target_session_attrs=read-write`: skip a server in recovery (a standby), so that the
    /// relay follows a promotion.
    pub(crate) read_write: bool,
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
        let hosts: Vec<String> = self.hosts.iter().map(|(h, p)| format!("{h}:{p}")).collect();
        write!(
            f,
            "postgres://{}{pw}@{}/{}",
            self.user,
            hosts.join(","),
            self.dbname
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
                // `h1:p1,h2:p2`: the key=value form's two lists.
                let (mut hosts, mut ports) = (Vec::new(), Vec::new());
                for one in hostport.split(',') {
                    let (h, p) = match one.rsplit_once(':') {
                        Some((h, p)) if !h.ends_with(']') || one.starts_with('[') => (h, Some(p)),
                        _ => (one, None),
                    };
                    hosts.push(h.trim_matches(['[', ']']).to_string());
                    ports.push(p.unwrap_or("").to_string());
                }
                kv.insert("host".into(), hosts.join(","));
                if ports.iter().any(|p| !p.is_empty()) {
                    kv.insert("port".into(), ports.join(","));
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
        let host_list: Vec<String> = kv
            .remove("host")
            .unwrap_or_else(|| "localhost".into())
            .split(',')
            .map(|h| h.trim().to_string())
            .collect();
        if host_list.iter().any(String::is_empty) {
            return Err("host: an empty entry in the list".into());
        }
        let ports: Vec<u16> = match kv.remove("port") {
            Some(p) => p
                .split(',')
                .map(|one| match one.trim() {
                    "" => Ok(5432),
                    n => n.parse().map_err(|_| format!("port '{n}' is not a number")),
                })
                .collect::<Result<_, _>>()?,
            None => vec![5432],
        };
        // libpq: one port for every host, or one per host.
        let hosts: Vec<(String, u16)> = match ports.len() {
            1 => host_list.iter().map(|h| (h.clone(), ports[0])).collect(),
            n if n == host_list.len() => host_list.into_iter().zip(ports).collect(),
            n => {
                return Err(format!(
                    "{} hosts but {n} ports: give one port, or one per host",
                    host_list.len()
                ))
            }
        };
        let read_write = match kv.remove("target_session_attrs").as_deref() {
            None | Some("any") => false,
            Some("read-write") | Some("primary") => true,
            Some(other) => {
                return Err(format!(
                    "target_session_attrs '{other}': the relay supports any, read-write and primary"
                ))
            }
        };
        let dsn = Dsn {
            host: hosts[0].0.clone(),
            port: hosts[0].1,
            hosts,
            read_write,
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
    fn several_hosts_are_tried_in_order_as_libpq_lists_them() {
        let a =
            Dsn::parse("host=db1,db2 port=5432,5433 dbname=shop target_session_attrs=read-write")
                .unwrap();
        let b = Dsn::parse("postgres://db1:5432,db2:5433/shop?target_session_attrs=read-write")
            .unwrap();
        assert_eq!(a.hosts, b.hosts);
        assert_eq!(a.hosts, vec![("db1".into(), 5432), ("db2".into(), 5433)]);
        assert!(a.read_write && b.read_write);
        assert_eq!((a.host.as_str(), a.port), ("db1", 5432));
        assert!(a.to_string().contains("db1:5432,db2:5433"), "{a}");
        let one_port = Dsn::parse("host=a,b port=6000").unwrap();
        assert_eq!(one_port.hosts, vec![("a".into(), 6000), ("b".into(), 6000)]);
        assert!(!one_port.read_write);
        assert!(Dsn::parse("host=a,b,c port=1,2")
            .unwrap_err()
            .contains("3 hosts but 2 ports"));
        assert!(Dsn::parse("host=a target_session_attrs=standby")
            .unwrap_err()
            .contains("target_session_attrs"));
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
