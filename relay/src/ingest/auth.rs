//! Bearer tokens and their scopes. Pure: the registry stores only [`hash`]es, and the API asks
//! [`Scopes::allows`] before it does anything.
//!
//! Scopes: `admin` (everything: event types, tokens, publishing), `read` (list and read event
//! types), `write:{event_type}` (publish events of that type).

use sha2::{Digest, Sha256};

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action<'a> {
    /// Create or change event types, create tokens.
    Admin,
    /// List or read event types.
    Read,
    /// Publish events of this type.
    Write(&'a str),
}

/// The scopes of one token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Scopes(pub(crate) Vec<String>);

impl Scopes {
    pub(crate) fn admin() -> Scopes {
        Scopes(vec!["admin".into()])
    }

    pub(crate) fn allows(&self, action: Action<'_>) -> bool {
        self.0.iter().any(|s| {
            s == "admin"
                || match action {
                    Action::Admin => false,
                    Action::Read => s == "read",
                    Action::Write(t) => s.strip_prefix("write:") == Some(t),
                }
        })
    }
}

/// Whether a scope is one the API knows (`admin`, `read`, `write:{valid event type name}`).
pub(crate) fn valid_scope(s: &str) -> bool {
    s == "admin"
        || s == "read"
        || s.strip_prefix("write:")
            .is_some_and(crate::ingest::events::valid_name)
}

/// The SHA-256 of a token, hex: what the registry stores. Tokens are long random strings, so
/// a fast hash is enough (no password stretching is needed against guessing).
pub(crate) fn hash(token: &str) -> String {
    let d = Sha256::digest(token.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token: 256 random bits (two v4 UUIDs' worth, 244 of them random), hex.
pub(crate) fn new_token() -> String {
    format!(
        "sk_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The token of an `Authorization: Bearer …` header value.
pub(crate) fn bearer(header: Option<&str>) -> Option<&str> {
    let v = header?.trim();
    let (scheme, token) = v.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// Compares two secrets in time independent of where they differ.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (hash(a), hash(b));
    a.bytes()
        .zip(b.bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_allow_what_they_name_and_admin_allows_everything() {
        let w = Scopes(vec!["write:parcel.packed".into()]);
        assert!(w.allows(Action::Write("parcel.packed")));
        assert!(!w.allows(Action::Write("parcel")));
        assert!(!w.allows(Action::Read) && !w.allows(Action::Admin));
        let r = Scopes(vec!["read".into()]);
        assert!(r.allows(Action::Read) && !r.allows(Action::Write("x")));
        let a = Scopes::admin();
        assert!(a.allows(Action::Admin) && a.allows(Action::Read) && a.allows(Action::Write("x")));
        assert!(!Scopes::default().allows(Action::Read));
        assert!(valid_scope("write:a.b") && !valid_scope("write:") && !valid_scope("delete"));
    }

    #[test]
    fn tokens_are_hashed_and_read_from_bearer_headers() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let t = new_token();
        assert_eq!(t.len(), 3 + 64);
        assert_ne!(t, new_token());
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
        assert!(same_secret("x", "x") && !same_secret("x", "y"));
    }
}
