//! Encodes one PostgreSQL datum as a JSON value (docs/types.md).
//!
//! How a type is encoded is decided once per type and cached ([`TypeCache`]): fast paths
//! for booleans, integers, text and bytea read the datum directly; floats and numerics go
//! through the type's output function (so the digits are exactly PostgreSQL's); json/jsonb
//! are embedded; arrays and composites are walked element by element; everything else is
//! its output function's text as a JSON string.
//!
//! Invariant: [`TypeCache::write`] never detoasts an on-disk TOAST pointer. The caller
//! checks for those first (they are the unchanged-TOAST columns of an update); every other
//! varlena in a decoded tuple is inline, compressed, or an in-memory indirect pointer.

use std::collections::HashMap;
use std::rc::Rc;

use pgrx::pg_sys;
use saiki_core::json::{write_i64, write_json_compact, write_number_text, write_str};
use saiki_core::options::{NumberClass, NumbersAsStrings};

/// How a type's values are written.
pub enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    /// Output function, then a bare number unless NaN/Infinity or quoted by option.
    Number(NumberClass, OutputFn),
    /// Output function, embedded as JSON.
    Json(OutputFn),
    /// text, varchar, bpchar: the bytes of the varlena, as a string.
    Text,
    /// `"\\x…"` hex, as PostgreSQL's default `bytea_output` prints it.
    Bytea,
    Array {
        elem_type: pg_sys::Oid,
        elem: Rc<TypeEnc>,
        elmlen: i16,
        elmbyval: bool,
        elmalign: std::ffi::c_char,
    },
    Composite,
    /// Output function's text as a JSON string.
    Text2String(OutputFn),
}

/// A type's output function, looked up once. Boxed so its address is stable.
pub struct OutputFn(Box<pg_sys::FmgrInfo>);

pub struct TypeEnc {
    pub kind: Kind,
}

/// Per-session cache of type encoders. Lives in the plugin state; the `FmgrInfo`s point
/// into the decoding context's memory, which outlives the cache.
pub struct TypeCache {
    types: HashMap<pg_sys::Oid, Rc<TypeEnc>>,
    mcxt: pg_sys::MemoryContext,
    pub numbers: NumbersAsStrings,
}

impl TypeCache {
    pub fn new(mcxt: pg_sys::MemoryContext, numbers: NumbersAsStrings) -> Self {
        TypeCache {
            types: HashMap::new(),
            mcxt,
            numbers,
        }
    }

    /// The encoder for a type, built on first use.
    ///
    /// # Safety
    /// Must run in a backend with catalog access (a decoding callback or SQL function).
    pub unsafe fn get(&mut self, typid: pg_sys::Oid) -> Rc<TypeEnc> {
        if let Some(t) = self.types.get(&typid) {
            return t.clone();
        }
        let t = Rc::new(self.build(typid));
        self.types.insert(typid, t.clone());
        t
    }

    unsafe fn build(&mut self, typid: pg_sys::Oid) -> TypeEnc {
        // SAFETY: catalog lookups of a type that exists in the historic snapshot.
        let base = unsafe { pg_sys::getBaseType(typid) };
        let mcxt = self.mcxt;
        // SAFETY: a type that exists; the FmgrInfo lives as long as the decoding context.
        let out = || unsafe { OutputFn::lookup(base, mcxt) };
        let kind = match base {
            pg_sys::BOOLOID => Kind::Bool,
            pg_sys::INT2OID => Kind::Int2,
            pg_sys::INT4OID => Kind::Int4,
            pg_sys::INT8OID => Kind::Int8,
            pg_sys::OIDOID => Kind::Oid,
            pg_sys::FLOAT4OID | pg_sys::FLOAT8OID => Kind::Number(NumberClass::Float, out()),
            pg_sys::NUMERICOID => Kind::Number(NumberClass::Numeric, out()),
            pg_sys::JSONOID | pg_sys::JSONBOID => Kind::Json(out()),
            pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => Kind::Text,
            pg_sys::BYTEAOID => Kind::Bytea,
            // Array-shaped system types whose canonical form is their text ("1 2 3").
            pg_sys::INT2VECTOROID | pg_sys::OIDVECTOROID => Kind::Text2String(out()),
            _ => {
                // SAFETY: as above.
                let elem_type = unsafe { pg_sys::get_element_type(base) };
                if elem_type != pg_sys::InvalidOid {
                    let mut elmlen = 0i16;
                    let mut elmbyval = false;
                    let mut elmalign: std::ffi::c_char = 0;
                    // SAFETY: out-pointers to locals.
                    unsafe {
                        pg_sys::get_typlenbyvalalign(
                            elem_type,
                            &mut elmlen,
                            &mut elmbyval,
                            &mut elmalign,
                        )
                    };
                    // SAFETY: recursion over a finite type graph (arrays of arrays do not exist).
                    let elem = unsafe { self.get(elem_type) };
                    Kind::Array {
                        elem_type,
                        elem,
                        elmlen,
                        elmbyval,
                        elmalign,
                    }
                } else if unsafe { pg_sys::type_is_rowtype(base) } && base != pg_sys::RECORDOID {
                    Kind::Composite
                } else {
                    Kind::Text2String(out())
                }
            }
        };
        TypeEnc { kind }
    }

    /// Appends the JSON value of `datum` (not NULL) of type `enc`.
    ///
    /// # Safety
    /// `datum` is a valid, non-null datum of the type `enc` was built for, and is not an
    /// on-disk TOAST pointer. Allocations go to the current memory context.
    pub unsafe fn write(&mut self, buf: &mut Vec<u8>, enc: &TypeEnc, datum: pg_sys::Datum) {
        let q = self.numbers;
        match &enc.kind {
            Kind::Bool => buf.extend_from_slice(if datum.value() != 0 {
                b"true"
            } else {
                b"false"
            }),
            Kind::Int2 => write_i64(
                buf,
                datum.value() as i16 as i64,
                q.quotes(NumberClass::SmallInt),
            ),
            Kind::Int4 => write_i64(
                buf,
                datum.value() as i32 as i64,
                q.quotes(NumberClass::SmallInt),
            ),
            Kind::Int8 => write_i64(buf, datum.value() as i64, q.quotes(NumberClass::Int8)),
            Kind::Oid => write_i64(
                buf,
                datum.value() as u32 as i64,
                q.quotes(NumberClass::SmallInt),
            ),
            Kind::Number(class, f) => {
                // SAFETY: output function of this type, called on a value of it.
                let text = unsafe { f.call(datum) };
                write_number_text(buf, text, q.quotes(*class));
            }
            Kind::Json(f) => {
                // SAFETY: as above.
                let text = unsafe { f.call(datum) };
                write_json_compact(buf, text);
            }
            Kind::Text => {
                // SAFETY: a text-like varlena; detoasting handles compressed and indirect.
                let bytes = unsafe { varlena_bytes(datum) };
                write_str(buf, bytes);
            }
            Kind::Bytea => {
                // SAFETY: as above.
                let bytes = unsafe { varlena_bytes(datum) };
                write_bytea_hex(buf, bytes);
            }
            Kind::Array {
                elem_type,
                elem,
                elmlen,
                elmbyval,
                elmalign,
            } => {
                // SAFETY: an array datum of this element type.
                unsafe {
                    self.write_array(
                        buf,
                        datum,
                        *elem_type,
                        elem.clone(),
                        *elmlen,
                        *elmbyval,
                        *elmalign,
                    )
                }
            }
            Kind::Composite => {
                // SAFETY: a composite datum.
                unsafe { self.write_composite(buf, datum) }
            }
            Kind::Text2String(f) => {
                // SAFETY: output function of this type, called on a value of it.
                let text = unsafe { f.call(datum) };
                write_str(buf, text);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn write_array(
        &mut self,
        buf: &mut Vec<u8>,
        datum: pg_sys::Datum,
        elem_type: pg_sys::Oid,
        elem: Rc<TypeEnc>,
        elmlen: i16,
        elmbyval: bool,
        elmalign: std::ffi::c_char,
    ) {
        // SAFETY: detoasted copy (or the original) of an array value, aligned as ArrayType.
        let arr =
            unsafe { pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) } as *mut pg_sys::ArrayType;
        let ndim = unsafe { (*arr).ndim }.max(0) as usize;
        if ndim == 0 {
            buf.extend_from_slice(b"[]");
            return;
        }
        // SAFETY: ARR_DIMS: the dimensions follow the fixed header.
        let dims: Vec<usize> = unsafe {
            let p = (arr as *const u8).add(std::mem::size_of::<pg_sys::ArrayType>()) as *const i32;
            (0..ndim).map(|i| (*p.add(i)).max(0) as usize).collect()
        };
        let mut elems: *mut pg_sys::Datum = std::ptr::null_mut();
        let mut nulls: *mut bool = std::ptr::null_mut();
        let mut n = 0;
        // SAFETY: out-pointers; the arrays are palloc'd in the current (per-change) context.
        unsafe {
            pg_sys::deconstruct_array(
                arr,
                elem_type,
                elmlen as i32,
                elmbyval,
                elmalign,
                &mut elems,
                &mut nulls,
                &mut n,
            )
        };
        let n = n.max(0) as usize;
        // SAFETY: deconstruct_array returned n elements and n null flags.
        let (elems, nulls) = unsafe {
            if n == 0 {
                (&[][..], &[][..])
            } else {
                (
                    std::slice::from_raw_parts(elems, n),
                    std::slice::from_raw_parts(nulls, n),
                )
            }
        };
        let mut idx = 0;
        // SAFETY: elements are values of the element type.
        unsafe { self.write_dim(buf, &dims, elems, nulls, &mut idx, &elem) };
    }

    unsafe fn write_dim(
        &mut self,
        buf: &mut Vec<u8>,
        dims: &[usize],
        elems: &[pg_sys::Datum],
        nulls: &[bool],
        idx: &mut usize,
        elem: &TypeEnc,
    ) {
        buf.push(b'[');
        for i in 0..dims[0] {
            if i > 0 {
                buf.push(b',');
            }
            if dims.len() > 1 {
                // SAFETY: same elements, one dimension down.
                unsafe { self.write_dim(buf, &dims[1..], elems, nulls, idx, elem) };
            } else {
                match (elems.get(*idx), nulls.get(*idx)) {
                    (Some(_), Some(true)) | (None, _) => buf.extend_from_slice(b"null"),
                    // SAFETY: a non-null element of the element type.
                    (Some(d), _) => unsafe { self.write(buf, elem, *d) },
                }
                *idx += 1;
            }
        }
        buf.push(b']');
    }

    unsafe fn write_composite(&mut self, buf: &mut Vec<u8>, datum: pg_sys::Datum) {
        // SAFETY: a composite datum is a HeapTupleHeader varlena; detoast it first.
        unsafe {
            let td = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) as pg_sys::HeapTupleHeader;
            let typid = (*td).t_choice.t_datum.datum_typeid;
            let typmod = (*td).t_choice.t_datum.datum_typmod;
            let tupdesc = pg_sys::lookup_rowtype_tupdesc(typid, typmod);
            let natts = (*tupdesc).natts.max(0) as usize;
            let mut tuple = pg_sys::HeapTupleData {
                t_len: pgrx::varlena::varsize_any(td as *const pg_sys::varlena) as u32,
                t_data: td,
                ..Default::default()
            };
            let mut values = vec![pg_sys::Datum::from(0usize); natts];
            let mut isnull = vec![true; natts];
            pg_sys::heap_deform_tuple(
                &mut tuple,
                tupdesc,
                values.as_mut_ptr(),
                isnull.as_mut_ptr(),
            );
            let mut fields: Vec<(Vec<u8>, pg_sys::Oid, usize)> = Vec::with_capacity(natts);
            for i in 0..natts {
                let att = tuple_desc_attr(tupdesc, i);
                if (*att).attisdropped {
                    continue;
                }
                let name: Vec<u8> = std::ffi::CStr::from_ptr((*att).attname.data.as_ptr())
                    .to_bytes()
                    .to_vec();
                fields.push((name, (*att).atttypid, i));
            }
            if (*tupdesc).tdrefcount >= 0 {
                pg_sys::DecrTupleDescRefCount(tupdesc);
            }
            let mut obj = saiki_core::encode::ObjectWriter::open(buf);
            for (name, atttypid, i) in fields {
                obj.field_str(buf, &name);
                if isnull[i] {
                    buf.extend_from_slice(b"null");
                } else {
                    let enc = self.get(atttypid);
                    self.write(buf, &enc, values[i]);
                }
            }
            obj.close(buf);
        }
    }
}

impl OutputFn {
    /// Looks up the output function of `typid`, with `fn_extra` allocations in `mcxt`.
    ///
    /// # Safety
    /// `typid` is an existing type; `mcxt` outlives every call through the result.
    unsafe fn lookup(typid: pg_sys::Oid, mcxt: pg_sys::MemoryContext) -> OutputFn {
        let mut foid = pg_sys::InvalidOid;
        let mut varlena = false;
        let mut f: Box<pg_sys::FmgrInfo> = Box::default();
        // SAFETY: per the contract above; `f` is a valid FmgrInfo to fill.
        unsafe {
            pg_sys::getTypeOutputInfo(typid, &mut foid, &mut varlena);
            pg_sys::fmgr_info_cxt(foid, &mut *f, mcxt);
        }
        OutputFn(f)
    }

    /// Calls the output function and returns the C string's bytes.
    ///
    /// # Safety
    /// `datum` is a non-null value of the type. The result is palloc'd in the current memory
    /// context and valid until that context is reset.
    unsafe fn call<'a>(&self, datum: pg_sys::Datum) -> &'a [u8] {
        // SAFETY: per the contract above; the FmgrInfo is valid for the session.
        unsafe {
            let p = pg_sys::OutputFunctionCall(&*self.0 as *const _ as *mut _, datum);
            std::ffi::CStr::from_ptr(p).to_bytes()
        }
    }
}

/// The payload bytes of a varlena datum, detoasting compressed or indirect values.
///
/// # Safety
/// `datum` is a varlena that is not an on-disk TOAST pointer.
pub unsafe fn varlena_bytes<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: pg_detoast_datum_packed returns the value or a palloc'd detoasted copy.
    unsafe {
        let v = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        let len = pgrx::varlena::varsize_any_exhdr(v);
        let data = pgrx::varlena::vardata_any(v) as *const u8;
        std::slice::from_raw_parts(data, len)
    }
}

fn write_bytea_hex(buf: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.reserve(bytes.len() * 2 + 5);
    buf.extend_from_slice(b"\"\\\\x");
    for &b in bytes {
        buf.push(HEX[(b >> 4) as usize]);
        buf.push(HEX[(b & 0xF) as usize]);
    }
    buf.push(b'"');
}

/// Whether a varlena datum is an on-disk TOAST pointer (VARATT_IS_EXTERNAL_ONDISK): a value
/// that the WAL does not carry and that must not be fetched during decoding.
///
/// # Safety
/// `datum` points at a varlena.
pub unsafe fn is_external_ondisk(datum: pg_sys::Datum) -> bool {
    let p = datum.cast_mut_ptr::<pg_sys::varlena>();
    // SAFETY: reading the varlena header bytes.
    unsafe {
        pgrx::varlena::varatt_is_1b_e(p)
            && pgrx::varlena::vartag_external(p) == pg_sys::vartag_external::VARTAG_ONDISK as u8
    }
}

/// TupleDescAttr(desc, i): the i-th attribute of a tuple descriptor.
///
/// # Safety
/// `i` < `desc->natts`.
pub unsafe fn tuple_desc_attr(
    desc: pg_sys::TupleDesc,
    i: usize,
) -> *const pg_sys::FormData_pg_attribute {
    // SAFETY: attrs is the descriptor's trailing array of natts entries.
    unsafe { (*desc).attrs.as_ptr().add(i) }
}
