//! The output plugin's options (docs/plugin.md, "Options"), parsed from the `(name, value)` pairs that
//! `pg_logical_slot_get_changes(..., VARIADIC options)` or `START_REPLICATION ... (options)`
//! pass. Unknown options and unparsable values are errors that name the option; the plugin
//! raises them as SQLSTATE 22023.

use crate::Error;

/// Every option name the plugin accepts, for error messages.
pub const KNOWN_OPTIONS: &str = "format-version, include-xids, include-lsn, include-timestamp, \
include-types, include-origin, include-transaction, skip-empty-xacts, add-tables, filter-tables, \
add-msg-prefixes, filter-msg-prefixes, filter-origins, actions, numbers-as-strings, stream-changes, \
batch-bytes";

/// Largest `batch-bytes`: the plugin's output buffer never holds more than this plus one record.
pub const MAX_BATCH_BYTES: usize = 16 << 20;

/// Which numeric classes are written as JSON strings instead of numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NumbersAsStrings {
    /// Every number bare (the default): exact digits, as PostgreSQL prints them.
    #[default]
    None,
    /// `int8` quoted: JavaScript-style consumers lose precision above 2^53.
    Int8,
    /// `int8` and `numeric` quoted: every type a double cannot hold exactly.
    Numeric,
    /// Every number quoted.
    All,
}

/// The numeric classes a column can belong to, for [`NumbersAsStrings::quotes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberClass {
    /// int2, int4, oid
    SmallInt,
    Int8,
    /// float4, float8
    Float,
    Numeric,
}

impl NumbersAsStrings {
    /// Whether a number of this class is written quoted.
    pub fn quotes(self, class: NumberClass) -> bool {
        match self {
            NumbersAsStrings::None => false,
            NumbersAsStrings::Int8 => class == NumberClass::Int8,
            NumbersAsStrings::Numeric => matches!(class, NumberClass::Int8 | NumberClass::Numeric),
            NumbersAsStrings::All => true,
        }
    }
}

/// Which kinds of change are emitted (`actions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actions {
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
    pub message: bool,
    /// Schema changes (`L` records).
    pub ddl: bool,
}

impl Default for Actions {
    fn default() -> Self {
        Actions {
            insert: true,
            update: true,
            delete: true,
            truncate: true,
            message: true,
            ddl: true,
        }
    }
}

/// A `schema.table` pattern; `*` in either part matches any run of characters.
/// A backslash makes the next character literal (`my\.schema.t`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePattern {
    schema: Vec<PatternChar>,
    table: Vec<PatternChar>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatternChar {
    Lit(char),
    Star,
}

impl TablePattern {
    /// Parses one pattern; `option` is used for the error message.
    pub fn parse(option: &str, text: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::InvalidOptionValue {
            name: option.to_string(),
            value: text.to_string(),
            reason: reason.to_string(),
        };
        let mut parts: Vec<Vec<PatternChar>> = vec![Vec::new()];
        let mut chars = text.trim().chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(n) => parts.last_mut().unwrap().push(PatternChar::Lit(n)),
                    None => return Err(bad("ends with a lone backslash")),
                },
                '.' => parts.push(Vec::new()),
                '*' => parts.last_mut().unwrap().push(PatternChar::Star),
                c => parts.last_mut().unwrap().push(PatternChar::Lit(c)),
            }
        }
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(bad(
                "expected schema.table, with * as a wildcard and \\ before a literal '.', ',' or '*'",
            ));
        }
        let table = parts.pop().unwrap();
        let schema = parts.pop().unwrap();
        Ok(TablePattern { schema, table })
    }

    pub fn matches(&self, schema: &str, table: &str) -> bool {
        glob(&self.schema, &schema.chars().collect::<Vec<_>>())
            && glob(&self.table, &table.chars().collect::<Vec<_>>())
    }
}

fn glob(p: &[PatternChar], s: &[char]) -> bool {
    // Iterative wildcard matching with one backtrack point (linear for '*' patterns).
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(PatternChar::Lit(c)) if *c == s[si] => {
                pi += 1;
                si += 1;
            }
            Some(PatternChar::Star) => {
                star = Some((pi, si));
                pi += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == PatternChar::Star)
}

/// The parsed options of one decoding session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub include_timestamp: bool,
    pub include_types: bool,
    pub include_origin: bool,
    pub include_transaction: bool,
    pub skip_empty_xacts: bool,
    pub add_tables: Vec<TablePattern>,
    pub filter_tables: Vec<TablePattern>,
    pub add_msg_prefixes: Vec<String>,
    pub filter_msg_prefixes: Vec<String>,
    /// Origins whose changes are left out; `*` leaves out every change that has an origin.
    pub filter_origins: Vec<String>,
    pub actions: Actions,
    pub numbers_as_strings: NumbersAsStrings,
    pub stream_changes: bool,
    /// 0: one record per output message. Otherwise records are joined with `\n` into one
    /// message of about this many bytes, flushed at every commit, stream stop and
    /// non-transactional message: far fewer messages (and walsender sends) per change.
    pub batch_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            include_timestamp: false,
            include_types: false,
            include_origin: false,
            include_transaction: true,
            skip_empty_xacts: true,
            add_tables: Vec::new(),
            filter_tables: Vec::new(),
            add_msg_prefixes: Vec::new(),
            filter_msg_prefixes: Vec::new(),
            filter_origins: Vec::new(),
            actions: Actions::default(),
            numbers_as_strings: NumbersAsStrings::None,
            stream_changes: false,
            batch_bytes: 0,
        }
    }
}

/// PostgreSQL's `parse_bool` spellings: true/false, yes/no, on/off, 1/0 and unique prefixes
/// of true/false/yes/no.
pub fn parse_bool(v: &str) -> Option<bool> {
    let l = v.trim().to_ascii_lowercase();
    match l.as_str() {
        "1" | "on" => return Some(true),
        "0" | "off" => return Some(false),
        _ => {}
    }
    if l.is_empty() {
        return None;
    }
    for (word, val) in [
        ("true", true),
        ("yes", true),
        ("false", false),
        ("no", false),
    ] {
        if word.starts_with(&l) {
            return Some(val);
        }
    }
    None
}

/// Splits a comma-separated list; a backslash keeps the next character (so `\,` is a comma).
/// Whitespace around items is trimmed; empty items are refused.
fn split_list(name: &str, value: &str) -> Result<Vec<String>, Error> {
    let mut items = vec![String::new()];
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                // Keep the escape for table patterns, which interpret it themselves.
                items.last_mut().unwrap().push('\\');
                if let Some(n) = chars.next() {
                    items.last_mut().unwrap().push(n);
                }
            }
            ',' => items.push(String::new()),
            c => items.last_mut().unwrap().push(c),
        }
    }
    let items: Vec<String> = items.into_iter().map(|s| s.trim().to_string()).collect();
    if items.iter().any(|s| s.is_empty()) {
        return Err(Error::InvalidOptionValue {
            name: name.to_string(),
            value: value.to_string(),
            reason: "expected a comma-separated list without empty items".to_string(),
        });
    }
    Ok(items)
}

/// Removes the list escapes from a plain (non-pattern) list item.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Options {
    /// Parses the options given to a decoding session. A bare option (no value) means true.
    pub fn parse<'a, I>(pairs: I) -> Result<Options, Error>
    where
        I: IntoIterator<Item = (&'a str, Option<&'a str>)>,
    {
        let mut o = Options::default();
        for (name, value) in pairs {
            let invalid = |reason: &str| Error::InvalidOptionValue {
                name: name.to_string(),
                value: value.unwrap_or("").to_string(),
                reason: reason.to_string(),
            };
            let boolean = || -> Result<bool, Error> {
                match value {
                    None => Ok(true),
                    Some(v) => {
                        parse_bool(v).ok_or_else(|| invalid("expected a boolean (true or false)"))
                    }
                }
            };
            let list = || -> Result<Vec<String>, Error> {
                match value {
                    None => Err(invalid("expected a comma-separated list")),
                    Some(v) => split_list(name, v),
                }
            };
            match name {
                "format-version" => match value.map(str::trim) {
                    Some("1") => {}
                    _ => return Err(invalid("this plugin writes format-version 1 only")),
                },
                // Accepted for wal2json users: xid and lsn are always present.
                "include-xids" | "include-lsn" => {
                    boolean()?;
                }
                "include-timestamp" => o.include_timestamp = boolean()?,
                "include-types" => o.include_types = boolean()?,
                "include-origin" => o.include_origin = boolean()?,
                "include-transaction" => o.include_transaction = boolean()?,
                "skip-empty-xacts" => o.skip_empty_xacts = boolean()?,
                "stream-changes" => o.stream_changes = boolean()?,
                "add-tables" | "filter-tables" => {
                    let pats = list()?
                        .iter()
                        .map(|p| TablePattern::parse(name, p))
                        .collect::<Result<Vec<_>, _>>()?;
                    if name == "add-tables" {
                        o.add_tables.extend(pats);
                    } else {
                        o.filter_tables.extend(pats);
                    }
                }
                "add-msg-prefixes" => o
                    .add_msg_prefixes
                    .extend(list()?.iter().map(|s| unescape(s))),
                "filter-msg-prefixes" => o
                    .filter_msg_prefixes
                    .extend(list()?.iter().map(|s| unescape(s))),
                "filter-origins" => o.filter_origins.extend(list()?.iter().map(|s| unescape(s))),
                "actions" => {
                    let mut a = Actions {
                        insert: false,
                        update: false,
                        delete: false,
                        truncate: false,
                        message: false,
                        ddl: false,
                    };
                    for item in list()? {
                        match item.to_ascii_lowercase().as_str() {
                            "insert" => a.insert = true,
                            "update" => a.update = true,
                            "delete" => a.delete = true,
                            "truncate" => a.truncate = true,
                            "message" => a.message = true,
                            "ddl" => a.ddl = true,
                            _ => {
                                return Err(invalid(
                                    "expected a list of insert, update, delete, truncate, message, ddl",
                                ))
                            }
                        }
                    }
                    o.actions = a;
                }
                "batch-bytes" => {
                    o.batch_bytes = match value.map(|v| v.trim().parse::<usize>()) {
                        Some(Ok(n)) if n <= MAX_BATCH_BYTES => n,
                        _ => {
                            return Err(invalid(&format!(
                                "expected a number of bytes from 0 (one record per message) to {MAX_BATCH_BYTES}"
                            )))
                        }
                    }
                }
                "numbers-as-strings" => {
                    o.numbers_as_strings =
                        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
                            Some("none") => NumbersAsStrings::None,
                            Some("int8") => NumbersAsStrings::Int8,
                            Some("numeric") => NumbersAsStrings::Numeric,
                            Some("all") | None => NumbersAsStrings::All,
                            Some(_) => return Err(invalid("expected none, int8, numeric or all")),
                        }
                }
                _ => {
                    return Err(Error::UnknownOption {
                        name: name.to_string(),
                        known: KNOWN_OPTIONS,
                    })
                }
            }
        }
        Ok(o)
    }

    /// Whether changes of `schema.table` are emitted (`add-tables`, then `filter-tables`).
    /// The extension's own tables (schema `saiki`: snapshot progress, DDL shapes) never are.
    pub fn table_included(&self, schema: &str, table: &str) -> bool {
        if schema == "saiki" {
            return false;
        }
        if !self.add_tables.is_empty() && !self.add_tables.iter().any(|p| p.matches(schema, table))
        {
            return false;
        }
        !self.filter_tables.iter().any(|p| p.matches(schema, table))
    }

    /// Whether a logical message with this prefix is emitted.
    pub fn message_included(&self, prefix: &str) -> bool {
        if !self.add_msg_prefixes.is_empty() && !self.add_msg_prefixes.iter().any(|p| p == prefix) {
            return false;
        }
        !self.filter_msg_prefixes.iter().any(|p| p == prefix)
    }

    /// Whether a change from the named replication origin is left out.
    pub fn origin_filtered(&self, origin: &str) -> bool {
        self.filter_origins.iter().any(|o| o == "*" || o == origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(pairs: &[(&str, Option<&str>)]) -> Result<Options, Error> {
        Options::parse(pairs.iter().copied())
    }

    #[test]
    fn no_options_give_the_defaults() {
        let o = parse(&[]).unwrap();
        assert!(o.include_transaction && o.skip_empty_xacts && !o.include_types);
        assert_eq!(o.numbers_as_strings, NumbersAsStrings::None);
    }

    #[test]
    fn a_bare_option_means_true() {
        let o = parse(&[("include-types", None), ("include-timestamp", Some("on"))]).unwrap();
        assert!(o.include_types && o.include_timestamp);
    }

    #[test]
    fn unknown_options_are_refused_by_name() {
        let e = parse(&[("include-typos", Some("1"))]).unwrap_err();
        assert!(e.to_string().contains("\"include-typos\""), "{e}");
    }

    #[test]
    fn unparsable_values_name_the_option_and_the_value() {
        let e = parse(&[("include-types", Some("maybe"))]).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("include-types") && m.contains("maybe"), "{m}");
        assert!(parse(&[("format-version", Some("2"))]).is_err());
        assert!(parse(&[("actions", Some("insert,upsert"))]).is_err());
        assert!(parse(&[("numbers-as-strings", Some("some"))]).is_err());
        assert!(parse(&[("add-tables", Some("orders"))]).is_err());
        assert!(parse(&[("add-tables", Some("a.b,,c.d"))]).is_err());
        assert!(parse(&[("batch-bytes", Some("-1"))]).is_err());
        assert!(parse(&[("batch-bytes", Some("99999999999"))]).is_err());
        assert!(parse(&[("batch-bytes", None)]).is_err());
        assert_eq!(
            parse(&[("batch-bytes", Some("65536"))])
                .unwrap()
                .batch_bytes,
            65536
        );
    }

    #[test]
    fn table_patterns_filter_with_wildcards_and_escapes() {
        let o = parse(&[
            ("add-tables", Some("public.*, shop.order*")),
            ("filter-tables", Some("public.secret")),
        ])
        .unwrap();
        assert!(o.table_included("public", "orders"));
        assert!(!o.table_included("public", "secret"));
        assert!(o.table_included("shop", "order_items"));
        assert!(!o.table_included("shop", "articles"));
        let o = parse(&[("add-tables", Some(r"my\.schema.t\*"))]).unwrap();
        assert!(o.table_included("my.schema", "t*"));
        assert!(!o.table_included("my.schema", "tx"));
    }

    #[test]
    fn message_prefixes_and_origins_filter() {
        let o = parse(&[
            ("add-msg-prefixes", Some("a,b")),
            ("filter-msg-prefixes", Some("b")),
        ])
        .unwrap();
        assert!(o.message_included("a") && !o.message_included("b") && !o.message_included("c"));
        let o = parse(&[("filter-origins", Some("*"))]).unwrap();
        assert!(o.origin_filtered("anything"));
    }

    #[test]
    fn numbers_as_strings_quotes_the_chosen_classes() {
        use NumberClass::*;
        assert!(!NumbersAsStrings::None.quotes(Int8));
        assert!(NumbersAsStrings::Int8.quotes(Int8) && !NumbersAsStrings::Int8.quotes(Numeric));
        assert!(
            NumbersAsStrings::Numeric.quotes(Numeric) && NumbersAsStrings::Numeric.quotes(Int8)
        );
        assert!(!NumbersAsStrings::Numeric.quotes(Float));
        assert!(NumbersAsStrings::All.quotes(SmallInt));
    }

    #[test]
    fn booleans_parse_like_postgres() {
        for t in ["true", "t", "TRUE", "yes", "y", "on", "1"] {
            assert_eq!(parse_bool(t), Some(true), "{t}");
        }
        for f in ["false", "f", "no", "n", "off", "0"] {
            assert_eq!(parse_bool(f), Some(false), "{f}");
        }
        for x in ["", "o", "2", "maybe"] {
            assert_eq!(parse_bool(x), None, "{x}");
        }
    }

    proptest! {
        #[test]
        fn a_star_pattern_matches_every_table(s in "[a-z_]{1,12}", t in "[a-z_.]{1,12}") {
            let p = TablePattern::parse("add-tables", "*.*").unwrap();
            prop_assert!(p.matches(&s, &t));
        }

        #[test]
        fn a_literal_pattern_matches_only_itself(s in "[a-z_]{1,8}", t in "[a-z_]{1,8}", u in "[a-z_]{1,8}") {
            let p = TablePattern::parse("add-tables", &format!("{s}.{t}")).unwrap();
            prop_assert!(p.matches(&s, &t));
            prop_assert_eq!(p.matches(&s, &u), t == u);
        }

        #[test]
        fn prefix_star_matches_like_starts_with(pre in "[a-z]{0,4}", t in "[a-z]{0,8}") {
            let p = TablePattern::parse("add-tables", &format!("public.{pre}*")).unwrap();
            prop_assert_eq!(p.matches("public", &t), t.starts_with(&pre));
        }
    }
}
