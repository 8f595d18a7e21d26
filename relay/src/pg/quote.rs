//! SQL quoting, the one place for it: replication commands, the source's simple queries and
//! the sink's statements all quote names and values here.

/// A quoted SQL identifier (`"slot"`, `"my""table"`).
pub(crate) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A quoted SQL string literal (`'it''s'`). Valid with `standard_conforming_strings = on`,
/// PostgreSQL's default since 9.1; the relay's connections never turn it off.
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_double_their_own_quote_only() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(ident("it's"), "\"it's\"");
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("a\"b\\n"), "'a\"b\\n'");
    }
}
