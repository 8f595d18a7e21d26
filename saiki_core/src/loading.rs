//! Whether PostgreSQL will load `saiki` as an output plugin.
//!
//! Current PostgreSQL minor releases (15.20 and the other back branches since then) load only
//! the output plugins named in the superuser setting `output_plugin_libraries` (default
//! `'pgoutput, test_decoding'`). Older minors do not have the setting and load any plugin.

/// The statements a DBA runs to allow the plugin.
pub const ALLOW_HINT: &str = "run as a superuser: ALTER SYSTEM SET output_plugin_libraries = \
'pgoutput, test_decoding, saiki'; SELECT pg_reload_conf();";

/// Whether `plugin` is allowed by the setting's value; `None` (no such setting) allows all.
/// Entries are comma-separated, may be double-quoted, and surrounding blanks do not count.
pub fn plugin_allowed(setting: Option<&str>, plugin: &str) -> bool {
    let Some(setting) = setting else {
        return true;
    };
    setting
        .split(',')
        .map(|e| e.trim())
        .map(|e| e.strip_prefix('"').and_then(|e| e.strip_suffix('"')).unwrap_or(e))
        .any(|e| e == plugin)
}

/// The list with `plugin` added, for the hint when it is missing.
pub fn setting_with(setting: &str, plugin: &str) -> String {
    let t = setting.trim();
    if t.is_empty() {
        plugin.to_string()
    } else {
        format!("{t}, {plugin}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saiki_is_allowed_only_when_listed() {
        assert!(plugin_allowed(None, "saiki"));
        assert!(!plugin_allowed(Some("pgoutput, test_decoding"), "saiki"));
        assert!(plugin_allowed(Some("pgoutput, test_decoding, saiki"), "saiki"));
        assert!(plugin_allowed(Some(" \"saiki\" "), "saiki"));
        assert!(!plugin_allowed(Some("saiki2"), "saiki"));
        assert!(!plugin_allowed(Some(""), "saiki"));
        assert_eq!(setting_with("pgoutput, test_decoding", "saiki"), "pgoutput, test_decoding, saiki");
    }
}
