//! How a change-log table's Iceberg schema follows its source tables (docs/lake.md, "Schema
//! changes"). Pure: [`evolve`] computes the next schema from the table's current one, the
//! columns the lake has met and the renames it was told of; [`widens`] is Iceberg's type
//! promotion rule; [`LoggedChange`] is an `L` record as the table's properties keep it.
//!
//! **Invariant.** A field keeps its id for life: a rename changes its name, a widening its
//! type, and a new column gets an id no field ever had. So every data file written before
//! stays readable under the current schema (readers project by field id), and the history of
//! a renamed column is in the column under its new name.

use std::sync::Arc;

use iceberg::spec::{NestedField, PrimitiveType, Schema, Type};
use saiki_core::ddl::Change;
use saiki_core::Lsn;
use serde::{Deserialize, Serialize};

/// The table property that lists the `L` records the table followed, so that a restarted
/// relay (or another one of the group) reads rows of lagging sources as the table does.
pub(crate) const LOG_PROPERTY: &str = "saiki.schema-changes";

/// An `L` record a change-log table followed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LoggedChange {
    pub(crate) source: String,
    pub(crate) lsn: Lsn,
    pub(crate) seq: i64,
    pub(crate) changes: Vec<Change>,
}

/// The property's value with `more` added (an entry already there is not repeated).
pub(crate) fn log_with(current: Option<&str>, more: &[LoggedChange]) -> Result<String, String> {
    let mut log = read_log(current)?;
    for c in more {
        if !log
            .iter()
            .any(|l| l.source == c.source && l.lsn == c.lsn && l.seq == c.seq)
        {
            log.push(c.clone());
        }
    }
    serde_json::to_string(&log).map_err(|e| e.to_string())
}

/// The property's entries; a value written by something else is an error naming it.
pub(crate) fn read_log(value: Option<&str>) -> Result<Vec<LoggedChange>, String> {
    match value {
        None => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v)
            .map_err(|e| format!("table property {LOG_PROPERTY} is not the lake's: {e}")),
    }
}

/// Whether Iceberg lets a column of type `from` become `to` and keep its data files (the
/// specification's type promotions: int → long, float → double, a decimal's precision up
/// with its scale kept).
pub(crate) fn widens(from: &PrimitiveType, to: &PrimitiveType) -> bool {
    match (from, to) {
        (PrimitiveType::Int, PrimitiveType::Long) => true,
        (PrimitiveType::Float, PrimitiveType::Double) => true,
        (
            PrimitiveType::Decimal {
                precision: p1,
                scale: s1,
            },
            PrimitiveType::Decimal {
                precision: p2,
                scale: s2,
            },
        ) => s1 == s2 && p2 > p1,
        _ => false,
    }
}

/// The schema that holds what the lake knows, or `None` if `current` does already.
///
/// - `renames` (old name, new name), in order: a field named the old name takes the new one,
///   unless a field has the new name already (another relay renamed it, or the source added
///   the name again).
/// - `wanted`: the table's columns as the lake has them. A field of that name whose type
///   widens to the wanted one takes it; a column without a field gets one, with the next id
///   after `last_column_id` (the table's, which counts every id it ever gave).
/// - Nothing else changes: a field is never dropped or narrowed, and its id stays.
pub(crate) fn evolve(
    current: &Schema,
    last_column_id: i32,
    wanted: &[(String, PrimitiveType)],
    renames: &[(String, String)],
) -> Result<Option<Schema>, String> {
    let mut fields: Vec<NestedField> = current
        .as_struct()
        .fields()
        .iter()
        .map(|f| (**f).clone())
        .collect();
    let mut changed = false;
    for (from, to) in renames {
        if from == to || fields.iter().any(|f| &f.name == to) {
            continue;
        }
        if let Some(f) = fields.iter_mut().find(|f| &f.name == from) {
            f.name = to.clone();
            changed = true;
        }
    }
    let mut next_id = last_column_id.max(current.highest_field_id());
    for (name, ty) in wanted {
        match fields.iter_mut().find(|f| &f.name == name) {
            Some(f) => {
                if let Type::Primitive(have) = &*f.field_type {
                    if widens(have, ty) {
                        *f.field_type = Type::Primitive(ty.clone());
                        changed = true;
                    }
                }
            }
            None => {
                next_id += 1;
                fields.push(NestedField::optional(
                    next_id,
                    name,
                    Type::Primitive(ty.clone()),
                ));
                changed = true;
            }
        }
    }
    if !changed {
        return Ok(None);
    }
    Schema::builder()
        .with_fields(fields.into_iter().map(Arc::new))
        .with_identifier_field_ids(current.identifier_field_ids())
        .build()
        .map(Some)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &[(i32, &str, PrimitiveType)]) -> Schema {
        Schema::builder()
            .with_fields(fields.iter().map(|(id, n, t)| {
                Arc::new(NestedField::optional(*id, *n, Type::Primitive(t.clone())))
            }))
            .build()
            .unwrap()
    }

    fn fields(s: &Schema) -> Vec<(i32, String, String)> {
        s.as_struct()
            .fields()
            .iter()
            .map(|f| (f.id, f.name.clone(), f.field_type.to_string()))
            .collect()
    }

    fn dec(precision: u32, scale: u32) -> PrimitiveType {
        PrimitiveType::Decimal { precision, scale }
    }

    #[test]
    fn only_icebergs_promotions_widen_a_column() {
        assert!(widens(&PrimitiveType::Int, &PrimitiveType::Long));
        assert!(widens(&PrimitiveType::Float, &PrimitiveType::Double));
        assert!(widens(&dec(10, 2), &dec(12, 2)));
        assert!(!widens(&dec(10, 2), &dec(12, 3)));
        assert!(!widens(&dec(12, 2), &dec(10, 2)));
        assert!(!widens(&PrimitiveType::Long, &PrimitiveType::Int));
        assert!(!widens(&PrimitiveType::Int, &PrimitiveType::String));
        assert!(!widens(&PrimitiveType::String, &PrimitiveType::Long));
        assert!(!widens(&PrimitiveType::Int, &PrimitiveType::Int));
    }

    #[test]
    fn a_rename_keeps_the_fields_id_and_a_new_column_gets_an_id_never_given() {
        let s = schema(&[
            (8, "id", PrimitiveType::Int),
            (9, "note", PrimitiveType::String),
        ]);
        let wanted = vec![
            ("id".to_string(), PrimitiveType::Long),
            ("remark".to_string(), PrimitiveType::String),
            ("price".to_string(), dec(10, 2)),
        ];
        let renames = vec![("note".to_string(), "remark".to_string())];
        // Id 10 was given once (a column deleted by someone else): the new one gets 11.
        let next = evolve(&s, 10, &wanted, &renames).unwrap().unwrap();
        assert_eq!(
            fields(&next),
            vec![
                (8, "id".into(), "long".into()),
                (9, "remark".into(), "string".into()),
                (11, "price".into(), "decimal(10, 2)".into()),
            ]
        );
        // Evolving again changes nothing.
        assert_eq!(evolve(&next, 11, &wanted, &renames).unwrap(), None);
    }

    #[test]
    fn a_rename_that_another_relay_made_or_a_narrower_type_changes_nothing() {
        let s = schema(&[
            (8, "id", PrimitiveType::Long),
            (9, "remark", PrimitiveType::String),
        ]);
        let wanted = vec![("id".to_string(), PrimitiveType::Int)];
        let renames = vec![("note".to_string(), "remark".to_string())];
        assert_eq!(evolve(&s, 9, &wanted, &renames).unwrap(), None);
        // The old name and the new one both exist (the source added the old name again):
        // the rename does not touch them.
        let both = schema(&[
            (9, "note", PrimitiveType::String),
            (10, "remark", PrimitiveType::String),
        ]);
        assert_eq!(evolve(&both, 10, &[], &renames).unwrap(), None);
    }

    #[test]
    fn the_log_property_keeps_each_l_record_once_and_refuses_a_foreign_value() {
        let c = LoggedChange {
            source: "shard1".into(),
            lsn: Lsn(0x100),
            seq: 3,
            changes: vec![Change::RenameColumn {
                from: "note".into(),
                to: "remark".into(),
            }],
        };
        let once = log_with(None, std::slice::from_ref(&c)).unwrap();
        let twice = log_with(Some(&once), std::slice::from_ref(&c)).unwrap();
        assert_eq!(once, twice);
        assert_eq!(read_log(Some(&twice)).unwrap(), vec![c]);
        assert!(read_log(Some("{\"a\": 1}"))
            .unwrap_err()
            .contains(LOG_PROPERTY));
    }
}
