//! Schema changes (DESIGN.md §7, docs/plugin.md "Schema changes"): what a DDL statement did
//! to a captured table, from the table's shape before and after it. Pure: the extension's
//! event trigger reads the shapes from the catalog (`saiki.ddl_shape`), stores the last one
//! per table, and calls [`diff`] through `saiki.ddl_diff`; the plugin turns the message into an
//! `L` record.
//!
//! Why shapes and not the statement: PostgreSQL's event triggers tell which table a command
//! touched, not what it did to it in a form SQL can read (a rename's old name, say). Columns
//! keep their `attnum` through renames and type changes, and tables their oid through renames
//! and `SET SCHEMA`, so comparing two shapes by those numbers says exactly what changed, for
//! any statement, however many subcommands it has.

use serde::{Deserialize, Serialize};

/// A table as the catalog describes it at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub schema: String,
    pub table: String,
    /// Live columns in `attnum` order.
    pub columns: Vec<Column>,
    /// Primary key columns, in key order (empty without one).
    #[serde(default)]
    pub key: Vec<String>,
    /// `relreplident`: `d` default, `f` full, `i` index, `n` nothing.
    #[serde(default)]
    pub replica_identity: String,
}

/// One live column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub attnum: i32,
    pub name: String,
    /// `format_type(atttypid, atttypmod)`.
    #[serde(rename = "type")]
    pub type_name: String,
    pub nullable: bool,
    /// The default expression (`pg_get_expr`), if any.
    #[serde(default)]
    pub default: Option<String>,
    /// The value rows that existed before an `ADD COLUMN … DEFAULT` read (PostgreSQL's
    /// `attmissingval`, as text): set for constant defaults, absent for volatile ones, whose
    /// values the source computed per row.
    #[serde(default)]
    pub missing: Option<String>,
}

/// One thing a statement did to a table, in the `changes` list of an `L` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    CreateTable,
    DropTable,
    /// A new name or schema (`ALTER TABLE … RENAME TO`, `SET SCHEMA`): `schema.table` each.
    RenameTable {
        from: String,
        to: String,
    },
    AddColumn {
        column: String,
        #[serde(rename = "type")]
        type_name: String,
        nullable: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default: Option<String>,
        /// What the rows that existed before read in the new column (a constant default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        missing: Option<String>,
        /// A default that is not a constant (`now()`, `gen_random_uuid()`): the source
        /// computed a value per existing row, which the record does not carry.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        volatile: bool,
    },
    DropColumn {
        column: String,
    },
    RenameColumn {
        from: String,
        to: String,
    },
    AlterType {
        column: String,
        from: String,
        to: String,
    },
    SetNotNull {
        column: String,
    },
    DropNotNull {
        column: String,
    },
    SetDefault {
        column: String,
        default: String,
    },
    DropDefault {
        column: String,
    },
    /// The primary key changed (added, dropped or other columns).
    Key {
        from: Vec<String>,
        to: Vec<String>,
    },
    ReplicaIdentity {
        from: String,
        to: String,
    },
}

/// The schema-change fields of an `L` record as consumers read them (the relay's router and
/// the sink's planner); the rest of the record is an ordinary head.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchemaChangeFields {
    #[serde(default)]
    pub statement: String,
    #[serde(default)]
    pub changes: Vec<Change>,
    #[serde(default)]
    pub shape: Option<Shape>,
}

impl SchemaChangeFields {
    /// The table's former `schema.table` if the statement renamed it.
    pub fn renamed_from(&self) -> Option<&str> {
        self.changes.iter().find_map(|c| match c {
            Change::RenameTable { from, .. } => Some(from.as_str()),
            _ => None,
        })
    }

    /// Whether a column was added with a volatile default: the source computed a value per
    /// existing row, which only a new snapshot of the table brings.
    pub fn needs_snapshot(&self) -> bool {
        self.changes
            .iter()
            .any(|c| matches!(c, Change::AddColumn { volatile: true, .. }))
    }
}

fn qualified(s: &Shape) -> String {
    format!("{}.{}", s.schema, s.table)
}

/// What turned `old` into `new` (`old` is `None` for a table the extension has not seen:
/// created now, or there before the extension). Renames come before the changes that name
/// the new names; a column renamed and retyped gives both.
pub fn diff(old: Option<&Shape>, new: &Shape) -> Vec<Change> {
    let Some(old) = old else {
        return vec![Change::CreateTable];
    };
    let mut out = Vec::new();
    if (&old.schema, &old.table) != (&new.schema, &new.table) {
        out.push(Change::RenameTable {
            from: qualified(old),
            to: qualified(new),
        });
    }
    for o in &old.columns {
        match new.columns.iter().find(|n| n.attnum == o.attnum) {
            None => out.push(Change::DropColumn {
                column: o.name.clone(),
            }),
            Some(n) => {
                if n.name != o.name {
                    out.push(Change::RenameColumn {
                        from: o.name.clone(),
                        to: n.name.clone(),
                    });
                }
                if n.type_name != o.type_name {
                    out.push(Change::AlterType {
                        column: n.name.clone(),
                        from: o.type_name.clone(),
                        to: n.type_name.clone(),
                    });
                }
                match (o.nullable, n.nullable) {
                    (true, false) => out.push(Change::SetNotNull {
                        column: n.name.clone(),
                    }),
                    (false, true) => out.push(Change::DropNotNull {
                        column: n.name.clone(),
                    }),
                    _ => {}
                }
                match (&o.default, &n.default) {
                    (_, Some(d)) if o.default.as_ref() != Some(d) => out.push(Change::SetDefault {
                        column: n.name.clone(),
                        default: d.clone(),
                    }),
                    (Some(_), None) => out.push(Change::DropDefault {
                        column: n.name.clone(),
                    }),
                    _ => {}
                }
            }
        }
    }
    for n in &new.columns {
        if !old.columns.iter().any(|o| o.attnum == n.attnum) {
            out.push(Change::AddColumn {
                column: n.name.clone(),
                type_name: n.type_name.clone(),
                nullable: n.nullable,
                default: n.default.clone(),
                missing: n.missing.clone(),
                volatile: n.default.is_some() && n.missing.is_none(),
            });
        }
    }
    if old.key != new.key {
        out.push(Change::Key {
            from: old.key.clone(),
            to: new.key.clone(),
        });
    }
    if old.replica_identity != new.replica_identity {
        out.push(Change::ReplicaIdentity {
            from: old.replica_identity.clone(),
            to: new.replica_identity.clone(),
        });
    }
    out
}

/// The `renamed` object of an `L` record: old name → new name, for the table
/// (`schema.table`) and for columns.
pub fn renamed(changes: &[Change]) -> serde_json::Map<String, serde_json::Value> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::RenameTable { from, to } | Change::RenameColumn { from, to } => {
                Some((from.clone(), serde_json::Value::String(to.clone())))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn col(attnum: i32, name: &str, ty: &str) -> Column {
        Column {
            attnum,
            name: name.into(),
            type_name: ty.into(),
            nullable: true,
            default: None,
            missing: None,
        }
    }

    fn items() -> Shape {
        Shape {
            schema: "public".into(),
            table: "items".into(),
            columns: vec![
                col(1, "id", "integer"),
                col(2, "n", "integer"),
                col(3, "note", "text"),
            ],
            key: vec!["id".into()],
            replica_identity: "d".into(),
        }
    }

    #[test]
    fn a_table_never_seen_is_created() {
        assert_eq!(diff(None, &items()), [Change::CreateTable]);
        assert!(diff(Some(&items()), &items()).is_empty());
    }

    #[test]
    fn columns_are_matched_by_attnum_through_renames_and_type_changes() {
        let mut new = items();
        new.columns[2].name = "remark".into();
        new.columns[1].type_name = "bigint".into();
        assert_eq!(
            diff(Some(&items()), &new),
            [
                Change::AlterType {
                    column: "n".into(),
                    from: "integer".into(),
                    to: "bigint".into()
                },
                Change::RenameColumn {
                    from: "note".into(),
                    to: "remark".into()
                },
            ]
        );
        // A column dropped and one of the same name added is a drop and an add, not a rename.
        let mut readded = items();
        readded.columns[2].attnum = 4;
        let d = diff(Some(&items()), &readded);
        assert_eq!(
            d.iter()
                .map(|c| serde_json::to_value(c).unwrap()["change"].clone())
                .collect::<Vec<_>>(),
            [json!("drop_column"), json!("add_column")]
        );
    }

    #[test]
    fn added_columns_say_what_existing_rows_read() {
        let mut new = items();
        let mut price = col(4, "price", "numeric(10,2)");
        price.default = Some("1.50".into());
        price.missing = Some("1.50".into());
        let mut at = col(5, "created", "timestamp with time zone");
        at.default = Some("now()".into());
        new.columns.extend([price, at]);
        let d = serde_json::to_value(diff(Some(&items()), &new)).unwrap();
        assert_eq!(
            d,
            json!([
                {"change": "add_column", "column": "price", "type": "numeric(10,2)", "nullable": true, "default": "1.50", "missing": "1.50"},
                {"change": "add_column", "column": "created", "type": "timestamp with time zone", "nullable": true, "default": "now()", "volatile": true}
            ])
        );
    }

    #[test]
    fn renames_keys_nullability_defaults_and_identity_are_reported() {
        let mut new = items();
        new.schema = "sales".into();
        new.table = "items_v2".into();
        new.columns[1].nullable = false;
        new.columns[2].default = Some("'x'::text".into());
        new.key = vec!["id".into(), "n".into()];
        new.replica_identity = "f".into();
        let d = diff(Some(&items()), &new);
        let kinds: Vec<String> = d
            .iter()
            .map(|c| {
                serde_json::to_value(c).unwrap()["change"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "rename_table",
                "set_not_null",
                "set_default",
                "key",
                "replica_identity"
            ]
        );
        assert_eq!(
            serde_json::Value::Object(renamed(&d)),
            json!({"public.items": "sales.items_v2"})
        );
        let back = diff(Some(&new), &items());
        assert!(back.contains(&Change::DropNotNull { column: "n".into() }));
        assert!(back.contains(&Change::DropDefault {
            column: "note".into()
        }));
    }

    #[test]
    fn an_l_records_fields_say_where_a_table_came_from_and_whether_it_needs_a_snapshot() {
        let read = |j: &str| serde_json::from_str::<SchemaChangeFields>(j).unwrap();
        let l = read(
            r#"{"action":"L","xid":1,"schema":"sales","table":"items_v2","ddl":"ALTER TABLE","changes":[{"change":"rename_table","from":"public.items","to":"sales.items_v2"}]}"#,
        );
        assert_eq!(l.renamed_from(), Some("public.items"));
        assert!(!l.needs_snapshot());
        assert_eq!(
            read(r#"{"changes":[{"change":"drop_table"}]}"#).renamed_from(),
            None
        );
        assert!(read(r#"{"changes":[{"change":"add_column","column":"s","type":"bigint","nullable":true,"default":"nextval('q'::regclass)","volatile":true}]}"#).needs_snapshot());
        assert!(!read(r#"{"changes":[{"change":"add_column","column":"s","type":"bigint","nullable":true,"default":"1","missing":"1"}]}"#).needs_snapshot());
    }

    #[test]
    fn changes_round_trip_through_json() {
        let mut new = items();
        new.columns.pop();
        new.columns.push(col(4, "x", "text"));
        for c in diff(Some(&items()), &new) {
            let v = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Change>(&v).unwrap(), c, "{v}");
        }
    }
}
