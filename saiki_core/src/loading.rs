//! Whether PostgreSQL will load `saiki` as an output plugin.
//!
//! Current PostgreSQL minor releases (15.20 and the other back branches since then) load only
//! the output plugins named in the superuser setting `output_plugin_libraries` (default
//! `pgoutput, test_decoding`). Older minors do not have the setting and load any plugin.
//!
//! The setting is a *list* (like `shared_preload_libraries`): in SQL each library is its own
//! literal. `ALTER SYSTEM SET output_plugin_libraries = 'pgoutput, test_decoding, saiki'`
//! (one literal, as the design contract once wrote it) sets a single element named
//! `pgoutput, test_decoding, saiki` and allows none of the three; see docs/deviations.md.

/// The statements a DBA runs to allow the plugin on a default server.
pub const ALLOW_HINT: &str = "run as a superuser: ALTER SYSTEM SET output_plugin_libraries = \
'pgoutput', 'test_decoding', 'saiki'; SELECT pg_reload_conf();";

/// Splits a list setting as PostgreSQL shows it: comma-separated elements, blanks around
/// them ignored, an element in double quotes may hold commas and `""` for a quote.
pub fn split_list(setting: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = setting.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut item = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        item.push('"');
                    } else {
                        break;
                    }
                } else {
                    item.push(c);
                }
            }
            while chars.peek().is_some_and(|c| *c != ',') {
                chars.next();
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                item.push(c);
                chars.next();
            }
            item = item.trim_end().to_string();
        }
        chars.next(); // the comma, if any
        if !item.is_empty() {
            out.push(item);
        }
    }
    out
}

/// Whether `plugin` is allowed by the setting's value; `None` (no such setting) allows all.
pub fn plugin_allowed(setting: Option<&str>, plugin: &str) -> bool {
    match setting {
        None => true,
        Some(s) => split_list(s).iter().any(|e| e == plugin),
    }
}

/// The right-hand side of `ALTER SYSTEM SET output_plugin_libraries = …` that keeps the
/// current elements and adds `plugin`: one SQL literal per library.
pub fn setting_with(setting: &str, plugin: &str) -> String {
    let mut items = split_list(setting);
    if !items.iter().any(|e| e == plugin) {
        items.push(plugin.to_string());
    }
    items
        .iter()
        .map(|e| format!("'{}'", e.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn saiki_is_allowed_only_when_listed() {
        assert!(plugin_allowed(None, "saiki"));
        assert!(!plugin_allowed(Some("pgoutput, test_decoding"), "saiki"));
        assert!(plugin_allowed(
            Some("pgoutput, test_decoding, saiki"),
            "saiki"
        ));
        assert!(plugin_allowed(Some(" \"saiki\" "), "saiki"));
        assert!(!plugin_allowed(Some("saiki2"), "saiki"));
        assert!(!plugin_allowed(Some(""), "saiki"));
    }

    #[test]
    fn one_quoted_literal_is_one_element_as_postgres_shows_it() {
        // What SHOW prints after ALTER SYSTEM SET x = 'pgoutput, test_decoding, saiki'.
        let shown = "\"pgoutput, test_decoding, saiki\"";
        assert_eq!(split_list(shown), vec!["pgoutput, test_decoding, saiki"]);
        assert!(!plugin_allowed(Some(shown), "saiki"));
    }

    #[test]
    fn the_hint_lists_one_literal_per_library() {
        assert_eq!(
            setting_with("pgoutput, test_decoding", "saiki"),
            "'pgoutput', 'test_decoding', 'saiki'"
        );
        assert_eq!(setting_with("", "saiki"), "'saiki'");
        assert_eq!(setting_with("a, saiki", "saiki"), "'a', 'saiki'");
        assert!(ALLOW_HINT.contains("'pgoutput', 'test_decoding', 'saiki'"));
    }

    proptest! {
        #[test]
        fn plain_lists_split_on_commas(items in prop::collection::vec("[a-z_][a-z0-9_]{0,10}", 0..6)) {
            let joined = items.join(", ");
            prop_assert_eq!(split_list(&joined), items);
        }

        #[test]
        fn quoted_elements_round_trip(items in prop::collection::vec("[a-z ,\"]{1,10}", 1..5)) {
            let items: Vec<String> = items.into_iter().filter(|s| !s.trim().is_empty()).collect();
            let shown = items.iter().map(|e| format!("\"{}\"", e.replace('"', "\"\""))).collect::<Vec<_>>().join(", ");
            prop_assert_eq!(split_list(&shown), items);
        }
    }
}
