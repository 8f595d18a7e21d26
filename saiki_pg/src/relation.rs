//! Per-relation facts the plugin needs for every change, computed once per relation and
//! dropped when PostgreSQL invalidates the relation's cache entry (DDL, rename, replica
//! identity change): names, columns with their encoders, key and identity columns, the
//! `types` object, and whether the table passes the session's filters.

use std::ffi::CStr;
use std::rc::Rc;

use pgrx::pg_sys;
use saiki_core::json::write_str;
use saiki_core::options::Options;

use crate::value::{TypeCache, TypeEnc};

pub struct Column {
    /// Index into the tuple descriptor (attnum - 1).
    pub index: usize,
    /// The name as a JSON string, quotes included.
    pub name_json: Vec<u8>,
    pub enc: Rc<TypeEnc>,
    pub varlena: bool,
}

pub struct RelInfo {
    pub included: bool,
    pub schema_json: Vec<u8>,
    pub table_json: Vec<u8>,
    /// Non-dropped columns in table order.
    pub columns: Vec<Column>,
    /// Natts of the tuple descriptor (dropped columns included).
    pub natts: usize,
    /// Positions in `columns` of the key (docs/plugin.md, `key`).
    pub key: Vec<usize>,
    /// Positions in `columns` written in `identity` from an old tuple: the replica identity
    /// index's columns, or every column under REPLICA IDENTITY FULL.
    pub identity: Vec<usize>,
    /// `,"types":{…}`, written when `include-types`.
    pub types_json: Vec<u8>,
}

/// Reads the relation's facts.
///
/// # Safety
/// `rel` is an open relation; runs inside a decoding callback (catalog access allowed).
pub unsafe fn build(rel: pg_sys::Relation, opts: &Options, types: &mut TypeCache) -> RelInfo {
    // SAFETY: reading fields of an open relation and catalog lookups.
    unsafe {
        let form = (*rel).rd_rel;
        let nsp = pg_sys::get_namespace_name((*form).relnamespace);
        let schema = if nsp.is_null() {
            "".to_string()
        } else {
            CStr::from_ptr(nsp).to_string_lossy().into_owned()
        };
        let table = CStr::from_ptr((*form).relname.data.as_ptr())
            .to_string_lossy()
            .into_owned();
        let included = opts.table_included(&schema, &table);
        let mut schema_json = Vec::new();
        write_str(&mut schema_json, schema.as_bytes());
        let mut table_json = Vec::new();
        write_str(&mut table_json, table.as_bytes());
        if !included {
            return RelInfo {
                included,
                schema_json,
                table_json,
                columns: Vec::new(),
                natts: 0,
                key: Vec::new(),
                identity: Vec::new(),
                types_json: Vec::new(),
            };
        }

        let desc = (*rel).rd_att;
        let natts = (*desc).natts.max(0) as usize;
        let mut columns = Vec::with_capacity(natts);
        let mut types_json = b",\"types\":{".to_vec();
        let mut attnum_to_col = vec![usize::MAX; natts];
        for (i, slot) in attnum_to_col.iter_mut().enumerate() {
            let att = crate::value::tuple_desc_attr(desc, i);
            if (*att).attisdropped {
                continue;
            }
            let name = CStr::from_ptr((*att).attname.data.as_ptr()).to_bytes();
            let mut name_json = Vec::with_capacity(name.len() + 2);
            write_str(&mut name_json, name);
            if !columns.is_empty() {
                types_json.push(b',');
            }
            types_json.extend_from_slice(&name_json);
            types_json.push(b':');
            let tname = pg_sys::format_type_with_typemod((*att).atttypid, (*att).atttypmod);
            write_str(&mut types_json, CStr::from_ptr(tname).to_bytes());
            *slot = columns.len();
            columns.push(Column {
                index: i,
                name_json,
                enc: types.get((*att).atttypid),
                varlena: (*att).attlen == -1,
            });
        }
        types_json.push(b'}');

        let bitmap_cols = |kind| -> Vec<usize> {
            let bms = pg_sys::RelationGetIndexAttrBitmap(rel, kind);
            let mut out = Vec::new();
            let mut m = -1;
            loop {
                m = pg_sys::bms_next_member(bms, m);
                if m < 0 {
                    break;
                }
                let attnum = m + pg_sys::FirstLowInvalidHeapAttributeNumber;
                if attnum >= 1 && (attnum as usize) <= natts {
                    let c = attnum_to_col[attnum as usize - 1];
                    if c != usize::MAX {
                        out.push(c);
                    }
                }
            }
            out.sort_unstable();
            out
        };
        let ident = (*form).relreplident as u8;
        let identity_key = bitmap_cols(pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_IDENTITY_KEY);
        let (key, identity) = match ident {
            b'f' => {
                let pk = bitmap_cols(pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY);
                let all: Vec<usize> = (0..columns.len()).collect();
                (if pk.is_empty() { all.clone() } else { pk }, all)
            }
            b'n' => {
                let pk = bitmap_cols(pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY);
                (pk, Vec::new())
            }
            // DEFAULT and INDEX: the identity index's columns (none for DEFAULT without a
            // primary key, which PostgreSQL treats as NOTHING).
            _ => (identity_key.clone(), identity_key),
        };
        RelInfo {
            included,
            schema_json,
            table_json,
            columns,
            natts,
            key,
            identity,
            types_json,
        }
    }
}
