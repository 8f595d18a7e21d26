//! The SQL that applies one table's staged rows to the ODS, built once per table and column
//! set and cached by [`crate::sink::ods::Ods`]. Pure: the unit tests below hold it against
//! the expected statements.
//!
//! A batch's net rows of one table are copied into a temporary staging table (`_op`: `I`
//! plain insert, `U` upsert, `D` delete; `_absent`: columns the change did not carry, kept
//! from the ODS row; `_key`: the key as text, for tombstones; `_check`: a possible replay),
//! then applied by at most four statements, each guarded so that **a row only moves
//! forward** (docs/sink.md): it is replaced or deleted only by a later `(commit_lsn, seq)` of
//! its source, and a replayed change never brings back a row that a later change deleted or
//! truncated.

use crate::pg::quote::{ident, literal};

/// The bookkeeping columns of every ODS table.
pub(crate) const SOURCE_COL: &str = "_saiki_source";
pub(crate) const LSN_COL: &str = "_saiki_commit_lsn";
pub(crate) const SEQ_COL: &str = "_saiki_seq";
pub(crate) const APPLIED_COL: &str = "_saiki_applied_at";

/// The statements for one ODS table, staging table and set of batch columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableStatements {
    /// `COPY` of the net rows into the staging table.
    pub(crate) copy: String,
    /// Rows new to the ODS (`_op = 'I'`): a plain `INSERT`, half the cost of `ON CONFLICT`;
    /// a key that is there after all fails it with a unique violation.
    pub(crate) insert: String,
    /// Rows with every column (`_op = 'U'`, nothing absent): `INSERT … ON CONFLICT DO UPDATE`
    /// under the ordering guard.
    pub(crate) upsert: String,
    /// Rows with absent columns (unchanged TOAST): a `MERGE` that keeps the ODS value of each
    /// absent column.
    pub(crate) merge_absent: String,
    /// Deletes under the ordering guard.
    pub(crate) delete: String,
    /// The tombstones of the deletes, against replays.
    pub(crate) tombstones: String,
}

/// A source's truncate of ODS table `qualified`: its rows older than the truncate (`$1`
/// source, `$2` LSN text, `$3` seq).
pub(crate) fn delete_truncated(qualified: &str) -> String {
    format!(
        "DELETE FROM {qualified} WHERE {} = $1 AND ({}, {}) < ($2::text::pg_lsn, $3::int)",
        ident(SOURCE_COL),
        ident(LSN_COL),
        ident(SEQ_COL)
    )
}

/// The truncation of a source, recorded against replays (`$1` ODS table, `$2` source, `$3`
/// LSN text, `$4` seq).
pub(crate) const RECORD_TRUNCATION: &str = "INSERT INTO saiki_sink.truncations AS x (ods_table, source, lsn, seq)
                     VALUES ($1, $2, $3::text::pg_lsn, $4)
                     ON CONFLICT (ods_table, source) DO UPDATE SET lsn = EXCLUDED.lsn, seq = EXCLUDED.seq
                     WHERE (x.lsn, x.seq) < (EXCLUDED.lsn, EXCLUDED.seq)";

/// One partition's end of a resync (`$1` ODS table, `$2` source, `$3` LSN text where the
/// resync started, `$4` the topic's partitions, `$5` this partition, `$6` topic): recorded,
/// returning whether every partition of the topic has now brought its end and the sweep is
/// still to do.
pub(crate) const RECORD_SWEEP: &str = "INSERT INTO saiki_sink.sweeps AS w (ods_table, source, before, topic, partitions, done)
                     VALUES ($1, $2, $3::text::pg_lsn, $6, $4, ARRAY[$5::int])
                     ON CONFLICT (ods_table, source, before, topic) DO UPDATE
                     SET done = ARRAY(SELECT DISTINCT p FROM unnest(w.done || $5::int) p ORDER BY p),
                         partitions = EXCLUDED.partitions
                     RETURNING cardinality(done) >= partitions AND swept_at IS NULL";

/// A finished sweep (`$1` ODS table, `$2` source, `$3` LSN text, `$4` rows deleted, `$5`
/// topic).
pub(crate) const SWEPT: &str = "UPDATE saiki_sink.sweeps SET swept_at = now(), rows = $4
                     WHERE ods_table = $1 AND source = $2 AND before = $3::text::pg_lsn AND topic = $5";

/// A source's greatest applied change of a table (`$1` ODS table, `$2` source, `$3` LSN text,
/// `$4` seq): changes at or below it may be replays.
pub(crate) const RAISE_WATERMARK: &str = "INSERT INTO saiki_sink.watermarks AS x (ods_table, source, lsn, seq)
                     VALUES ($1, $2, $3::text::pg_lsn, $4)
                     ON CONFLICT (ods_table, source) DO UPDATE SET lsn = EXCLUDED.lsn, seq = EXCLUDED.seq
                     WHERE (x.lsn, x.seq) < (EXCLUDED.lsn, EXCLUDED.seq)";

/// The watermarks of a table (`$1` ODS table).
pub(crate) const READ_WATERMARKS: &str =
    "SELECT source, lsn::text, seq FROM saiki_sink.watermarks WHERE ods_table = $1";

impl TableStatements {
    /// The statements for ODS table `name` (`qualified`: schema-qualified and quoted), its
    /// staging table `stage`, the batch's columns `cols` in staging order, and the ODS
    /// table's primary key.
    pub(crate) fn new(
        qualified: &str,
        name: &str,
        stage: &str,
        cols: &[&str],
        key_cols: &[String],
    ) -> Self {
        let (src, l, q) = (ident(SOURCE_COL), ident(LSN_COL), ident(SEQ_COL));
        let is_key = |c: &str| key_cols.iter().any(|k| k == c);
        let book = [SOURCE_COL, LSN_COL, SEQ_COL];
        let value_cols: Vec<&str> = cols.iter().copied().filter(|c| !is_key(c)).collect();
        let row_cols = || {
            book.iter()
                .copied()
                .chain(cols.iter().copied().filter(|c| *c != SOURCE_COL))
        };
        let insert_cols = row_cols()
            .map(ident)
            .chain(std::iter::once(ident(APPLIED_COL)))
            .collect::<Vec<_>>()
            .join(", ");
        let select_cols = row_cols()
            .map(|c| format!("s.{}", ident(c)))
            .chain(std::iter::once("statement_timestamp()".to_string()))
            .collect::<Vec<_>>()
            .join(", ");
        let conflict = key_cols
            .iter()
            .map(|c| ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let on = key_cols
            .iter()
            .map(|c| format!("t.{0} = s.{0}", ident(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let name_lit = literal(name);
        // A replayed change never brings back a row deleted or truncated by a later one.
        let not_gone = format!(
            "(NOT s._check OR (NOT EXISTS (SELECT 1 FROM saiki_sink.tombstones x WHERE x.ods_table = {name_lit} AND x.source = s.{src} AND x.key = s._key AND (x.lsn, x.seq) > (s.{l}, s.{q}))
             AND NOT EXISTS (SELECT 1 FROM saiki_sink.truncations x WHERE x.ods_table = {name_lit} AND x.source = s.{src} AND (x.lsn, x.seq) > (s.{l}, s.{q}))))"
        );

        let copy_cols = [
            "_op", "_absent", "_key", "_check", SOURCE_COL, LSN_COL, SEQ_COL,
        ]
        .into_iter()
        .chain(cols.iter().copied())
        .map(ident)
        .collect::<Vec<_>>()
        .join(", ");
        let copy = format!("COPY {stage} ({copy_cols}) FROM STDIN");

        let insert = format!(
            "INSERT INTO {qualified} ({insert_cols}) SELECT {select_cols} FROM {stage} s WHERE s._op = 'I'"
        );

        let mut sets: Vec<String> = value_cols
            .iter()
            .map(|c| format!("{0} = EXCLUDED.{0}", ident(c)))
            .collect();
        for b in book.iter().chain(std::iter::once(&APPLIED_COL)) {
            if !is_key(b) {
                sets.push(format!("{0} = EXCLUDED.{0}", ident(b)));
            }
        }
        let upsert = format!(
            "INSERT INTO {qualified} AS t ({insert_cols}) SELECT {select_cols} FROM {stage} s WHERE s._op = 'U' AND s._absent IS NULL AND {not_gone} ON CONFLICT ({conflict}) DO UPDATE SET {} WHERE {}",
            sets.join(", "),
            guard("EXCLUDED"),
        );

        let mut sets: Vec<String> = value_cols
            .iter()
            .map(|c| {
                format!(
                    "{0} = CASE WHEN {1} = ANY(s._absent) THEN t.{0} ELSE s.{0} END",
                    ident(c),
                    literal(c)
                )
            })
            .collect();
        for b in book {
            if !is_key(b) {
                sets.push(format!("{0} = s.{0}", ident(b)));
            }
        }
        sets.push(format!("{} = statement_timestamp()", ident(APPLIED_COL)));
        let merge_absent = format!(
            "MERGE INTO {qualified} AS t USING (SELECT * FROM {stage} s WHERE s._op = 'U' AND s._absent IS NOT NULL AND {not_gone}) AS s ON {on}
                 WHEN MATCHED AND {} THEN UPDATE SET {}
                 WHEN NOT MATCHED THEN INSERT ({insert_cols}) VALUES ({select_cols})",
            guard("s"),
            sets.join(", "),
        );

        let delete = format!(
            "DELETE FROM {qualified} AS t USING {stage} AS s WHERE s._op = 'D' AND {on} AND {}",
            guard("s")
        );
        let tombstones = format!(
            "INSERT INTO saiki_sink.tombstones AS x (ods_table, source, key, lsn, seq)
                 SELECT {name_lit}, s.{src}, s._key, s.{l}, s.{q} FROM {stage} s WHERE s._op = 'D'
                 ON CONFLICT (ods_table, source, key) DO UPDATE
                 SET lsn = EXCLUDED.lsn, seq = EXCLUDED.seq, deleted_at = now()
                 WHERE (x.lsn, x.seq) < (EXCLUDED.lsn, EXCLUDED.seq)"
        );
        TableStatements {
            copy,
            insert,
            upsert,
            merge_absent,
            delete,
            tombstones,
        }
    }
}

/// The ordering guard: the ODS row `t` is replaced by `new` only if `new` comes from another
/// source or is a later change `(commit_lsn, seq)` of the same source.
fn guard(new: &str) -> String {
    format!(
        "(t.{src} IS DISTINCT FROM {new}.{src} OR (t.{l}, t.{q}) < ({new}.{l}, {new}.{q}))",
        src = ident(SOURCE_COL),
        l = ident(LSN_COL),
        q = ident(SEQ_COL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders(key_includes_source: bool) -> TableStatements {
        let key: Vec<String> = if key_includes_source {
            vec![SOURCE_COL.into(), "id".into()]
        } else {
            vec!["id".into()]
        };
        TableStatements::new(
            r#""ods"."orders""#,
            "orders",
            r#"pg_temp."saiki_stage_orders""#,
            &["id", "qty"],
            &key,
        )
    }

    const NOT_GONE: &str = r#"(NOT s._check OR (NOT EXISTS (SELECT 1 FROM saiki_sink.tombstones x WHERE x.ods_table = 'orders' AND x.source = s."_saiki_source" AND x.key = s._key AND (x.lsn, x.seq) > (s."_saiki_commit_lsn", s."_saiki_seq"))
             AND NOT EXISTS (SELECT 1 FROM saiki_sink.truncations x WHERE x.ods_table = 'orders' AND x.source = s."_saiki_source" AND (x.lsn, x.seq) > (s."_saiki_commit_lsn", s."_saiki_seq"))))"#;

    #[test]
    fn rows_are_copied_with_their_bookkeeping_first() {
        assert_eq!(
            orders(true).copy,
            r#"COPY pg_temp."saiki_stage_orders" ("_op", "_absent", "_key", "_check", "_saiki_source", "_saiki_commit_lsn", "_saiki_seq", "id", "qty") FROM STDIN"#
        );
    }

    #[test]
    fn rows_new_to_the_ods_are_plain_inserts() {
        assert_eq!(
            orders(true).insert,
            r#"INSERT INTO "ods"."orders" ("_saiki_source", "_saiki_commit_lsn", "_saiki_seq", "id", "qty", "_saiki_applied_at") SELECT s."_saiki_source", s."_saiki_commit_lsn", s."_saiki_seq", s."id", s."qty", statement_timestamp() FROM pg_temp."saiki_stage_orders" s WHERE s._op = 'I'"#
        );
    }

    #[test]
    fn upserts_replace_a_row_only_with_a_later_change_of_its_source() {
        let guard = r#"(t."_saiki_source" IS DISTINCT FROM EXCLUDED."_saiki_source" OR (t."_saiki_commit_lsn", t."_saiki_seq") < (EXCLUDED."_saiki_commit_lsn", EXCLUDED."_saiki_seq"))"#;
        assert_eq!(
            orders(true).upsert,
            format!(
                r#"INSERT INTO "ods"."orders" AS t ("_saiki_source", "_saiki_commit_lsn", "_saiki_seq", "id", "qty", "_saiki_applied_at") SELECT s."_saiki_source", s."_saiki_commit_lsn", s."_saiki_seq", s."id", s."qty", statement_timestamp() FROM pg_temp."saiki_stage_orders" s WHERE s._op = 'U' AND s._absent IS NULL AND {NOT_GONE} ON CONFLICT ("_saiki_source", "id") DO UPDATE SET "qty" = EXCLUDED."qty", "_saiki_commit_lsn" = EXCLUDED."_saiki_commit_lsn", "_saiki_seq" = EXCLUDED."_saiki_seq", "_saiki_applied_at" = EXCLUDED."_saiki_applied_at" WHERE {guard}"#
            )
        );
        // Without the source in the key, a row may move to another source's change.
        assert!(orders(false)
            .upsert
            .contains(r#"ON CONFLICT ("id") DO UPDATE SET "qty" = EXCLUDED."qty", "_saiki_source" = EXCLUDED."_saiki_source","#));
    }

    #[test]
    fn absent_columns_keep_the_ods_value() {
        let m = orders(true).merge_absent;
        assert!(m.starts_with(&format!(
            r#"MERGE INTO "ods"."orders" AS t USING (SELECT * FROM pg_temp."saiki_stage_orders" s WHERE s._op = 'U' AND s._absent IS NOT NULL AND {NOT_GONE}) AS s ON t."_saiki_source" = s."_saiki_source" AND t."id" = s."id""#
        )), "{m}");
        assert!(m.contains(
            r#"THEN UPDATE SET "qty" = CASE WHEN 'qty' = ANY(s._absent) THEN t."qty" ELSE s."qty" END, "_saiki_commit_lsn" = s."_saiki_commit_lsn", "_saiki_seq" = s."_saiki_seq", "_saiki_applied_at" = statement_timestamp()"#
        ), "{m}");
        assert!(m.contains(r#"WHEN MATCHED AND (t."_saiki_source" IS DISTINCT FROM s."_saiki_source" OR (t."_saiki_commit_lsn", t."_saiki_seq") < (s."_saiki_commit_lsn", s."_saiki_seq"))"#), "{m}");
    }

    #[test]
    fn deletes_are_guarded_and_leave_tombstones() {
        let s = orders(true);
        assert_eq!(
            s.delete,
            r#"DELETE FROM "ods"."orders" AS t USING pg_temp."saiki_stage_orders" AS s WHERE s._op = 'D' AND t."_saiki_source" = s."_saiki_source" AND t."id" = s."id" AND (t."_saiki_source" IS DISTINCT FROM s."_saiki_source" OR (t."_saiki_commit_lsn", t."_saiki_seq") < (s."_saiki_commit_lsn", s."_saiki_seq"))"#
        );
        assert!(s.tombstones.contains(
            r#"SELECT 'orders', s."_saiki_source", s._key, s."_saiki_commit_lsn", s."_saiki_seq" FROM pg_temp."saiki_stage_orders" s WHERE s._op = 'D'"#
        ));
        assert_eq!(
            delete_truncated(r#""ods"."orders""#),
            r#"DELETE FROM "ods"."orders" WHERE "_saiki_source" = $1 AND ("_saiki_commit_lsn", "_saiki_seq") < ($2::text::pg_lsn, $3::int)"#
        );
    }

    #[test]
    fn names_are_quoted() {
        let s = TableStatements::new(
            r#""ods"."we""ird""#,
            "we\"ird",
            r#"pg_temp."saiki_stage_we""ird""#,
            &["i'd", "v"],
            &["i'd".to_string()],
        );
        assert!(s.copy.ends_with(r#""_saiki_seq", "i'd", "v") FROM STDIN"#));
        assert!(s.tombstones.contains("SELECT 'we\"ird', s."));
        assert!(s.upsert.contains(r#"ON CONFLICT ("i'd")"#));
    }
}
