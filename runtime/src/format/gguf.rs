//! The GGUF reader (versions 2 and 3, little-endian), no_std.
//!
//! Parsing is bounded and checked throughout (see ../shared/design/hardening.md): every
//! count and length is checked against the bytes actually left before anything is
//! allocated, every size and offset is computed with checked arithmetic, tensors must lie
//! inside the file without overlapping, and keys and tensor names must be unique. The
//! tensor data stays where it is: [`Gguf::tensor_data`] borrows it from the caller's bytes
//! (a memory map on std targets).

use crate::quant::WeightType;
use core::fmt;
use std::collections::BTreeMap;
use std::prelude::v1::*;

/// "GGUF" read as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
/// Longest key or tensor name accepted.
pub const MAX_NAME_LEN: u64 = 65_536;
/// Longest string value accepted (chat templates run to tens of kilobytes).
pub const MAX_STRING_LEN: u64 = 16 << 20;
/// Deepest nesting of arrays accepted.
pub const MAX_ARRAY_DEPTH: u32 = 3;
/// Most elements in one metadata array (the largest vocabularies and merge lists hold well
/// under a million). Parsed elements can take more memory than their bytes in the file (a
/// `String` per 8-byte empty string), so the count is capped, not only bounded by the file.
pub const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Most bytes of metadata and tensor descriptions read: real headers, 262k-token
/// vocabularies and their merges included, take a few tens of MiB. Parsed metadata can take
/// a few times its bytes in memory, so this bounds the memory a header costs whatever the
/// file's (possibly sparse) size.
pub const MAX_HEADER_BYTES: u64 = 256 << 20;
/// Most tensors in one file (large mixture-of-experts checkpoints hold about 100 000).
pub const MAX_TENSORS: u64 = 1 << 20;
/// Elements reserved ahead of parsing: collections then grow with what was really read, so
/// a large count on a sparse file cannot reserve gigabytes up front.
const RESERVE_AHEAD: usize = 4096;
/// Most dimensions a tensor may have (ggml's GGML_MAX_DIMS).
pub const MAX_DIMS: u32 = 4;
/// Largest `general.alignment` accepted.
pub const MAX_ALIGNMENT: u32 = 1 << 16;
const DEFAULT_ALIGNMENT: u32 = 32;

/// What is wrong with a GGUF file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GgufError {
    /// The file ends inside a field.
    Truncated {
        offset: u64,
        needed: u64,
    },
    BadMagic {
        found: u32,
    },
    /// A big-endian GGUF (its version field reads byte-swapped).
    BigEndian,
    UnsupportedVersion {
        version: u32,
    },
    /// A count or length larger than the bytes left could hold, or than the cap.
    CountTooLarge {
        what: &'static str,
        offset: u64,
        count: u64,
        limit: u64,
    },
    InvalidUtf8 {
        offset: u64,
    },
    NulInName {
        offset: u64,
    },
    UnknownValueType {
        offset: u64,
        value_type: u32,
    },
    ArrayTooDeep {
        offset: u64,
    },
    DuplicateKey {
        key: String,
    },
    BadAlignment {
        value: String,
    },
    BadDims {
        tensor: String,
        reason: String,
    },
    UnknownTensorType {
        tensor: String,
        ggml_type: u32,
    },
    /// Rows (the first dimension) are not a whole number of quantisation blocks.
    PartialBlock {
        tensor: String,
        row: u64,
        block: u64,
    },
    SizeOverflow {
        tensor: String,
    },
    DuplicateTensor {
        tensor: String,
    },
    TensorOutOfBounds {
        tensor: String,
        end: u64,
        file_len: u64,
    },
    /// The metadata and tensor descriptions run past [`MAX_HEADER_BYTES`].
    HeaderTooLarge {
        limit: u64,
    },
    /// A tensor not at the previous one's padded end (out of order, overlapping, or a gap).
    UnexpectedOffset {
        tensor: String,
        offset: u64,
        expected: u64,
    },
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use GgufError::*;
        match self {
            Truncated { offset, needed } => {
                write!(f, "file ends at byte {offset}, {needed} more bytes needed")
            }
            BadMagic { found } => write!(f, "not a GGUF file (magic {found:#010x})"),
            BigEndian => write!(f, "big-endian GGUF files are not supported"),
            HeaderTooLarge { limit } => write!(
                f,
                "the metadata and tensor descriptions run past {limit} bytes, more than edgetune reads"
            ),
            UnsupportedVersion { version } => {
                write!(f, "GGUF version {version} is not supported (2 and 3 are)")
            }
            CountTooLarge {
                what,
                offset,
                count,
                limit,
            } => {
                write!(
                    f,
                    "{what} at byte {offset} is {count}, more than the {limit} possible"
                )
            }
            InvalidUtf8 { offset } => write!(f, "string at byte {offset} is not UTF-8"),
            NulInName { offset } => write!(f, "name at byte {offset} contains a NUL byte"),
            UnknownValueType { offset, value_type } => write!(
                f,
                "unknown metadata value type {value_type} at byte {offset}"
            ),
            ArrayTooDeep { offset } => write!(
                f,
                "arrays nested deeper than {MAX_ARRAY_DEPTH} at byte {offset}"
            ),
            DuplicateKey { key } => write!(f, "metadata key `{key}` appears twice"),
            BadAlignment { value } => write!(
                f,
                "general.alignment {value} must be a u32 power of two <= {MAX_ALIGNMENT}"
            ),
            BadDims { tensor, reason } => write!(f, "tensor `{tensor}`: {reason}"),
            UnknownTensorType { tensor, ggml_type } => {
                write!(f, "tensor `{tensor}` has unknown ggml type {ggml_type}")
            }
            PartialBlock { tensor, row, block } => {
                write!(
                    f,
                    "tensor `{tensor}`: rows of {row} elements are not whole blocks of {block}"
                )
            }
            SizeOverflow { tensor } => write!(f, "tensor `{tensor}`: size overflows"),
            DuplicateTensor { tensor } => write!(f, "tensor `{tensor}` appears twice"),
            TensorOutOfBounds {
                tensor,
                end,
                file_len,
            } => {
                write!(
                    f,
                    "tensor `{tensor}` ends at byte {end}, past the end of the {file_len}-byte file"
                )
            }
            UnexpectedOffset {
                tensor,
                offset,
                expected,
            } => write!(
                f,
                "tensor `{tensor}` is at data offset {offset}, expected {expected} (tensors must follow each other in order)"
            ),
        }
    }
}

impl core::error::Error for GgufError {}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, stored by element type so its memory stays proportional to its bytes
/// in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Array {
    /// The element type, as messages name it.
    pub fn element_kind(&self) -> &'static str {
        match self {
            Array::U8(_) => "u8",
            Array::I8(_) => "i8",
            Array::U16(_) => "u16",
            Array::I16(_) => "i16",
            Array::U32(_) => "u32",
            Array::I32(_) => "i32",
            Array::F32(_) => "f32",
            Array::Bool(_) => "bool",
            Array::Str(_) => "string",
            Array::Array(_) => "array",
            Array::U64(_) => "u64",
            Array::I64(_) => "i64",
            Array::F64(_) => "f64",
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::Str(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Value {
    /// The value's type, as an error message names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::U8(_) | Value::U16(_) | Value::U32(_) | Value::U64(_) => "an unsigned integer",
            Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => "a signed integer",
            Value::F32(_) | Value::F64(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Str(_) => "a string",
            Value::Array(_) => "an array",
        }
    }

    /// The value's type, naming an array's element type too.
    pub fn kind_of_array(&self) -> String {
        match self {
            Value::Array(a) => format!("an array of {}", a.element_kind()),
            other => other.kind().into(),
        }
    }

    /// A scalar value as text, for messages (arrays and long strings are left out).
    pub fn brief(&self) -> Option<String> {
        Some(match self {
            Value::U8(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            Value::Bool(v) => v.to_string(),
            Value::Str(v) if v.len() <= 64 => format!("{v:?}"),
            Value::Str(_) | Value::Array(_) => return None,
        })
    }

    /// The value as an unsigned integer, if it is one of the integer types and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as f64, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A ggml tensor type id with its block layout where known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// (elements, bytes) per block, for every type whose layout is fixed and known.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        Some(match self.0 {
            0 => (1, 4),      // F32
            1 => (1, 2),      // F16
            2 => (32, 18),    // Q4_0
            3 => (32, 20),    // Q4_1
            6 => (32, 22),    // Q5_0
            7 => (32, 24),    // Q5_1
            8 => (32, 34),    // Q8_0
            9 => (32, 36),    // Q8_1
            10 => (256, 84),  // Q2_K
            11 => (256, 110), // Q3_K
            12 => (256, 144), // Q4_K
            13 => (256, 176), // Q5_K
            14 => (256, 210), // Q6_K
            15 => (256, 292), // Q8_K
            24 => (1, 1),     // I8
            25 => (1, 2),     // I16
            26 => (1, 4),     // I32
            27 => (1, 8),     // I64
            28 => (1, 8),     // F64
            30 => (1, 2),     // BF16
            _ => return None,
        })
    }

    /// The type as a weight format edgetune computes with, if it is one.
    pub fn weight_type(self) -> Option<WeightType> {
        WeightType::ALL.into_iter().find(|t| t.ggml_id() == self.0)
    }

    /// The name ggml uses.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            30 => "BF16",
            _ => "unknown",
        }
    }
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims\[0\]` is the row length (contiguous).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header. Tensor data stays in the caller's bytes.
#[derive(Debug, Clone)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u32,
    /// Absolute byte offset of the tensor data section.
    pub data_offset: u64,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

type R<T> = Result<T, GgufError>;

impl<'a> Reader<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.b.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> R<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                offset: self.b.len() as u64,
                needed: n - self.remaining(),
            });
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> R<[u8; N]> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> R<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> R<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A count of items of at least `min_item_bytes` each, checked against what is left.
    fn count(&mut self, what: &'static str, min_item_bytes: u64, cap: u64) -> R<u64> {
        let offset = self.offset();
        let count = self.u64()?;
        let limit = (self.remaining() / min_item_bytes.max(1)).min(cap);
        if count > limit {
            return Err(GgufError::CountTooLarge {
                what,
                offset,
                count,
                limit,
            });
        }
        Ok(count)
    }

    fn string(&mut self, what: &'static str, cap: u64) -> R<String> {
        let len = self.count(what, 1, cap)?;
        let offset = self.offset();
        let bytes = self.take(len)?;
        core::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| GgufError::InvalidUtf8 { offset })
    }

    fn name(&mut self, what: &'static str) -> R<String> {
        let offset = self.offset() + 8;
        let s = self.string(what, MAX_NAME_LEN)?;
        if s.contains('\0') {
            return Err(GgufError::NulInName { offset });
        }
        Ok(s)
    }

    fn value(&mut self, value_type: u32, depth: u32) -> R<Value> {
        let offset = self.offset();
        Ok(match value_type {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string("string length", MAX_STRING_LEN)?),
            9 => Value::Array(self.array_value(depth)?),
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(GgufError::UnknownValueType {
                    offset,
                    value_type: other,
                });
            }
        })
    }
}

impl Reader<'_> {
    fn array_value(&mut self, depth: u32) -> R<Array> {
        let offset = self.offset();
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::ArrayTooDeep { offset });
        }
        let elem_type = self.u32()?;
        let min = min_value_bytes(elem_type).ok_or(GgufError::UnknownValueType {
            offset,
            value_type: elem_type,
        })?;
        // Bounded by the bytes left: each element occupies at least `min` of them.
        let n = self.count("array length", min, MAX_ARRAY_LEN)? as usize;
        fn many<T>(n: usize, mut f: impl FnMut() -> R<T>) -> R<Vec<T>> {
            let mut v = Vec::with_capacity(n.min(RESERVE_AHEAD));
            for _ in 0..n {
                v.push(f()?);
            }
            Ok(v)
        }
        Ok(match elem_type {
            0 => Array::U8(self.take(n as u64)?.to_vec()),
            1 => Array::I8(self.take(n as u64)?.iter().map(|&b| b as i8).collect()),
            2 => Array::U16(many(n, || self.array().map(u16::from_le_bytes))?),
            3 => Array::I16(many(n, || self.array().map(i16::from_le_bytes))?),
            4 => Array::U32(many(n, || self.u32())?),
            5 => Array::I32(many(n, || self.array().map(i32::from_le_bytes))?),
            6 => Array::F32(many(n, || self.array().map(f32::from_le_bytes))?),
            7 => Array::Bool(self.take(n as u64)?.iter().map(|&b| b != 0).collect()),
            8 => Array::Str(many(n, || self.string("string length", MAX_STRING_LEN))?),
            9 => Array::Array(many(n, || self.array_value(depth + 1))?),
            10 => Array::U64(many(n, || self.u64())?),
            11 => Array::I64(many(n, || self.array().map(i64::from_le_bytes))?),
            _ => Array::F64(many(n, || self.array().map(f64::from_le_bytes))?),
        })
    }
}

/// The fewest bytes a value of this type occupies (bounds array allocations).
fn min_value_bytes(value_type: u32) -> Option<u64> {
    Some(match value_type {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,  // the length field of an empty string
        9 => 12, // element type and count of an empty array
        10..=12 => 8,
        _ => return None,
    })
}

impl Gguf {
    /// Parses the header of a GGUF file held in `bytes` (the whole file).
    pub fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
        Self::parse_within(bytes, MAX_HEADER_BYTES)
    }

    /// [`Gguf::parse`] with the header confined to its first `budget` bytes.
    fn parse_within(bytes: &[u8], budget: u64) -> Result<Gguf, GgufError> {
        let header_end = (bytes.len() as u64).min(budget) as usize;
        // Where the budget cut the file, running out of bytes (or of room for a count)
        // means the header would run past it.
        let cut = header_end < bytes.len();
        Self::parse_header(bytes, header_end).map_err(|e| match e {
            GgufError::Truncated { .. } | GgufError::CountTooLarge { .. } if cut => {
                GgufError::HeaderTooLarge { limit: budget }
            }
            other => other,
        })
    }

    /// Parses the header from `bytes[..header_end]`; tensor data may lie beyond it.
    fn parse_header(bytes: &[u8], header_end: usize) -> Result<Gguf, GgufError> {
        let mut r = Reader {
            b: &bytes[..header_end],
            pos: 0,
        };
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = r.u32()?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            return Err(GgufError::BigEndian);
        }
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { version });
        }
        // A tensor info is at least 8 (name length) + 4 (n_dims) + 8 (one dim) + 4 + 8 bytes;
        // a key-value pair at least 8 (key length) + 4 (type) + 1.
        let n_tensors = r.count("tensor count", 32, MAX_TENSORS)?;
        let n_kv = r.count("metadata count", 13, u64::MAX)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.name("key length")?;
            let value_type = r.u32()?;
            let value = r.value(value_type, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::DuplicateKey { key });
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() && *a <= MAX_ALIGNMENT => *a,
            Some(other) => {
                return Err(GgufError::BadAlignment {
                    value: format!("{other:?}"),
                });
            }
        };
        let mut tensors = Vec::with_capacity((n_tensors as usize).min(RESERVE_AHEAD));
        let mut names = BTreeMap::new();
        for _ in 0..n_tensors {
            let name = r.name("tensor name length")?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::BadDims {
                    tensor: name,
                    reason: format!("{n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = r.u64()?;
                if d == 0 || d > i64::MAX as u64 {
                    return Err(GgufError::BadDims {
                        tensor: name,
                        reason: format!("dimension {d} is out of range"),
                    });
                }
                dims.push(d);
            }
            let ggml_type = GgmlType(r.u32()?);
            let rel = r.u64()?;
            let (be, bb) =
                ggml_type
                    .block_layout()
                    .ok_or_else(|| GgufError::UnknownTensorType {
                        tensor: name.clone(),
                        ggml_type: ggml_type.0,
                    })?;
            if dims[0] % be != 0 {
                return Err(GgufError::PartialBlock {
                    tensor: name,
                    row: dims[0],
                    block: be,
                });
            }
            let size = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .and_then(|n| (n / be).checked_mul(bb))
                .ok_or_else(|| GgufError::SizeOverflow {
                    tensor: name.clone(),
                })?;
            if names.insert(name.clone(), ()).is_some() {
                return Err(GgufError::DuplicateTensor { tensor: name });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset: rel,
                size,
            });
        }
        let align = u64::from(alignment);
        let data_offset = r.offset().div_ceil(align) * align;
        // As ggml requires: tensors follow each other in order, each at the previous one's
        // end padded to the alignment, and all inside the file. This rules out overlaps,
        // gaps and reordering in one check.
        let file_len = bytes.len() as u64;
        let mut expected = 0u64;
        for t in &mut tensors {
            if t.offset != expected {
                return Err(GgufError::UnexpectedOffset {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    expected,
                });
            }
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        tensor: t.name.clone(),
                        end: end.unwrap_or(u64::MAX),
                        file_len,
                    });
                }
            }
            expected = (t.offset + t.size).div_ceil(align) * align;
            t.offset += data_offset;
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor, borrowed from the file's bytes (already bounds-checked by
    /// [`Gguf::parse`] against a file of the same length).
    pub fn tensor_data<'a>(&self, bytes: &'a [u8], t: &TensorInfo) -> Option<&'a [u8]> {
        let start = usize::try_from(t.offset).ok()?;
        let end = start.checked_add(usize::try_from(t.size).ok()?)?;
        bytes.get(start..end)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

#[cfg(test)]
mod tests {
    //! Hostile files built byte by byte, one per case of the hardening checklist, each
    //! expecting its specific error.
    use super::*;

    /// A small valid file: two metadata keys and two tensors, built field by field.
    #[derive(Clone)]
    struct Builder {
        version: u32,
        kv: Vec<(Vec<u8>, u32, Vec<u8>)>,
        tensors: Vec<(Vec<u8>, Vec<u64>, u32, u64)>,
        data_len: usize,
        align: usize,
    }

    fn s(x: &str) -> Vec<u8> {
        let mut v = (x.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(x.as_bytes());
        v
    }

    impl Builder {
        fn new() -> Builder {
            Builder {
                version: 3,
                kv: vec![
                    (s("general.architecture"), 8, s("llama")),
                    (s("llama.block_count"), 4, 2u32.to_le_bytes().to_vec()),
                ],
                // a: 64 f32 (256 bytes), b: 64 q8_0 (2 blocks, 68 bytes) at 256.
                tensors: vec![(s("a"), vec![64], 0, 0), (s("b"), vec![32, 2], 8, 256)],
                data_len: 256 + 68,
                align: 32,
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut b = MAGIC.to_le_bytes().to_vec();
            b.extend_from_slice(&self.version.to_le_bytes());
            b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            b.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
            for (k, t, v) in &self.kv {
                b.extend_from_slice(k);
                b.extend_from_slice(&t.to_le_bytes());
                b.extend_from_slice(v);
            }
            for (name, dims, ty, off) in &self.tensors {
                b.extend_from_slice(name);
                b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
                for d in dims {
                    b.extend_from_slice(&d.to_le_bytes());
                }
                b.extend_from_slice(&ty.to_le_bytes());
                b.extend_from_slice(&off.to_le_bytes());
            }
            while !b.len().is_multiple_of(self.align) {
                b.push(0);
            }
            b.extend(core::iter::repeat_n(0x11u8, self.data_len));
            b
        }
    }

    fn err(b: &[u8]) -> GgufError {
        Gguf::parse(b).unwrap_err()
    }

    #[test]
    fn a_header_past_the_budget_is_its_own_error() {
        let b = Builder::new().bytes();
        assert!(Gguf::parse_within(&b, b.len() as u64).is_ok());
        // The tensor data may lie past the budget; the header may not.
        let header = Gguf::parse(&b).unwrap().data_offset as usize;
        assert!(Gguf::parse_within(&b, header as u64).is_ok());
        assert_eq!(
            Gguf::parse_within(&b, 40).unwrap_err(),
            GgufError::HeaderTooLarge { limit: 40 }
        );
    }

    #[test]
    fn valid_file_parses() {
        let bytes = Builder::new().bytes();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(
            g.get("general.architecture").and_then(Value::as_str),
            Some("llama")
        );
        assert_eq!(g.get("llama.block_count").and_then(Value::as_u64), Some(2));
        let b = g.tensor("b").unwrap();
        assert_eq!(
            (b.size, b.ggml_type.weight_type()),
            (68, Some(WeightType::Q8_0))
        );
        assert_eq!(g.tensor_data(&bytes, b).unwrap().len(), 68);
        let mut v2 = Builder::new();
        v2.version = 2;
        assert!(Gguf::parse(&v2.bytes()).is_ok());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = Builder::new().bytes();
        for cut in 0..bytes.len() {
            assert!(
                Gguf::parse(&bytes[..cut]).is_err(),
                "truncated at {cut} parsed"
            );
        }
        assert!(matches!(
            err(&[]),
            GgufError::Truncated {
                offset: 0,
                needed: 4
            }
        ));
    }

    #[test]
    fn bad_magic_big_endian_and_versions() {
        let mut b = Builder::new().bytes();
        b[0] = b'X';
        assert!(matches!(err(&b), GgufError::BadMagic { .. }));
        let mut be = Builder::new().bytes();
        be[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(err(&be), GgufError::BigEndian);
        for v in [0u32, 1, 4, u32::MAX] {
            let mut x = Builder::new();
            x.version = v;
            assert_eq!(
                err(&x.bytes()),
                GgufError::UnsupportedVersion { version: v }
            );
        }
    }

    fn with_counts(tensors: u64, kv: u64) -> Vec<u8> {
        let mut b = Builder::new().bytes();
        b[8..16].copy_from_slice(&tensors.to_le_bytes());
        b[16..24].copy_from_slice(&kv.to_le_bytes());
        b
    }

    #[test]
    fn absurd_counts_are_rejected_before_allocating() {
        for n in [u64::MAX, 1 << 63, 1 << 40] {
            assert!(matches!(
                err(&with_counts(n, 2)),
                GgufError::CountTooLarge {
                    what: "tensor count",
                    ..
                }
            ));
            assert!(matches!(
                err(&with_counts(2, n)),
                GgufError::CountTooLarge {
                    what: "metadata count",
                    ..
                }
            ));
        }
        // Zero tensors and zero keys is a valid (empty) model file.
        let mut empty = Builder::new();
        empty.kv.clear();
        empty.tensors.clear();
        empty.data_len = 0;
        assert!(Gguf::parse(&empty.bytes()).unwrap().tensors.is_empty());
        // One more tensor than declared entries exist: the parse runs out of bytes.
        assert!(Gguf::parse(&with_counts(3, 2)).is_err());
    }

    #[test]
    fn string_lengths_past_the_end_or_the_cap() {
        for len in [u64::MAX, 1 << 63, 10_000, MAX_NAME_LEN + 1] {
            let mut x = Builder::new();
            let mut key = len.to_le_bytes().to_vec();
            key.extend_from_slice(b"k");
            x.kv[0].0 = key;
            assert!(
                matches!(
                    err(&x.bytes()),
                    GgufError::CountTooLarge {
                        what: "key length",
                        ..
                    }
                ),
                "{len}"
            );
        }
        let mut x = Builder::new();
        x.kv[0].2 = {
            let mut v = (u64::MAX).to_le_bytes().to_vec();
            v.push(b'a');
            v
        };
        assert!(matches!(
            err(&x.bytes()),
            GgufError::CountTooLarge {
                what: "string length",
                ..
            }
        ));
    }

    #[test]
    fn invalid_utf8_and_nul_in_names() {
        let mut x = Builder::new();
        x.kv[0].0 = {
            let mut v = 2u64.to_le_bytes().to_vec();
            v.extend_from_slice(&[0xC3, 0x28]);
            v
        };
        assert!(matches!(err(&x.bytes()), GgufError::InvalidUtf8 { .. }));
        let mut y = Builder::new();
        y.tensors[0].0 = s("a\0b");
        assert!(matches!(err(&y.bytes()), GgufError::NulInName { .. }));
    }

    #[test]
    fn arrays_overflowing_unknown_or_too_deep() {
        let array = |elem: u32, n: u64, payload: &[u8]| {
            let mut v = elem.to_le_bytes().to_vec();
            v.extend_from_slice(&n.to_le_bytes());
            v.extend_from_slice(payload);
            v
        };
        for n in [u64::MAX, 1 << 62, (u64::MAX / 8) + 1] {
            let mut x = Builder::new();
            x.kv[1] = (s("k"), 9, array(10, n, &[]));
            assert!(matches!(
                err(&x.bytes()),
                GgufError::CountTooLarge {
                    what: "array length",
                    ..
                }
            ));
        }
        let mut x = Builder::new();
        x.kv[1] = (s("k"), 9, array(99, 1, &[0]));
        assert!(matches!(
            err(&x.bytes()),
            GgufError::UnknownValueType { value_type: 99, .. }
        ));
        let mut deep = array(4, 0, &[]);
        for _ in 0..MAX_ARRAY_DEPTH {
            deep = array(9, 1, &deep);
        }
        let mut y = Builder::new();
        y.kv[1] = (s("k"), 9, deep);
        assert!(matches!(err(&y.bytes()), GgufError::ArrayTooDeep { .. }));
        let mut z = Builder::new();
        z.kv[1] = (s("k"), 13, vec![]);
        assert!(matches!(
            err(&z.bytes()),
            GgufError::UnknownValueType { value_type: 13, .. }
        ));
        // A well-formed array of strings reads back.
        let mut ok = Builder::new();
        ok.kv[1] = (s("k"), 9, array(8, 2, &[s("x"), s("yz")].concat()));
        let g = Gguf::parse(&ok.bytes()).unwrap();
        assert_eq!(
            g.get("k"),
            Some(&Value::Array(Array::Str(vec!["x".into(), "yz".into()])))
        );
    }

    #[test]
    fn bad_dimensions() {
        for dims in [
            vec![],
            vec![1, 1, 1, 1, 1],
            vec![0],
            vec![u64::MAX],
            vec![1 << 63],
        ] {
            let mut x = Builder::new();
            x.tensors[0].1 = dims.clone();
            assert!(
                matches!(err(&x.bytes()), GgufError::BadDims { .. }),
                "{dims:?}"
            );
        }
        let mut huge = Builder::new();
        huge.tensors[0].1 = vec![1 << 40, 1 << 40];
        assert!(matches!(err(&huge.bytes()), GgufError::SizeOverflow { .. }));
    }

    #[test]
    fn partial_blocks_and_unknown_types() {
        let mut x = Builder::new();
        x.tensors[1].1 = vec![33, 2];
        assert!(matches!(
            err(&x.bytes()),
            GgufError::PartialBlock {
                row: 33,
                block: 32,
                ..
            }
        ));
        for ty in [4u32, 5, 99, u32::MAX] {
            let mut y = Builder::new();
            y.tensors[1].2 = ty;
            assert!(
                matches!(err(&y.bytes()), GgufError::UnknownTensorType { .. }),
                "{ty}"
            );
        }
    }

    #[test]
    fn offsets_out_of_order_overlapping_gapped_or_past_the_end() {
        for (off_a, off_b) in [(256, 0), (0, 128), (0, 288), (32, 256)] {
            let mut x = Builder::new();
            x.tensors[0].3 = off_a;
            x.tensors[1].3 = off_b;
            assert!(
                matches!(err(&x.bytes()), GgufError::UnexpectedOffset { .. }),
                "{off_a} {off_b}"
            );
        }
        let mut short = Builder::new();
        short.data_len -= 1;
        assert!(matches!(
            err(&short.bytes()),
            GgufError::TensorOutOfBounds { .. }
        ));
        let mut wrap = Builder::new();
        wrap.tensors[1].3 = u64::MAX - 31;
        assert!(matches!(
            err(&wrap.bytes()),
            GgufError::UnexpectedOffset { .. }
        ));
    }

    #[test]
    fn alignment_must_be_a_sane_power_of_two_u32() {
        for (ty, v) in [
            (4u32, 0u32.to_le_bytes().to_vec()),
            (4, 3u32.to_le_bytes().to_vec()),
            (4, (1u32 << 20).to_le_bytes().to_vec()),
            (10, 32u64.to_le_bytes().to_vec()),
        ] {
            let mut x = Builder::new();
            x.kv.push((s("general.alignment"), ty, v));
            assert!(matches!(err(&x.bytes()), GgufError::BadAlignment { .. }));
        }
        let mut ok = Builder::new();
        ok.kv
            .push((s("general.alignment"), 4, 64u32.to_le_bytes().to_vec()));
        ok.align = 64;
        let bytes = ok.bytes();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!((g.alignment, g.data_offset % 64), (64, 0));
        assert_eq!(g.tensor("b").unwrap().offset, g.data_offset + 256);
    }

    #[test]
    fn duplicate_keys_and_tensor_names() {
        let mut x = Builder::new();
        x.kv[1].0 = s("general.architecture");
        x.kv[1].1 = 8;
        x.kv[1].2 = s("qwen2");
        assert_eq!(
            err(&x.bytes()),
            GgufError::DuplicateKey {
                key: "general.architecture".into()
            }
        );
        let mut y = Builder::new();
        y.tensors[1].0 = s("a");
        assert_eq!(
            err(&y.bytes()),
            GgufError::DuplicateTensor { tensor: "a".into() }
        );
    }

    #[test]
    fn metadata_is_data() {
        // A chat template full of template syntax and a path-like value are stored as text.
        let mut x = Builder::new();
        x.kv.push((
            s("tokenizer.chat_template"),
            8,
            s("{% for m in messages %}{{ m }}{% endfor %}"),
        ));
        x.kv.push((s("general.source.url"), 8, s("../../etc/passwd")));
        let g = Gguf::parse(&x.bytes()).unwrap();
        assert_eq!(
            g.get("general.source.url").and_then(Value::as_str),
            Some("../../etc/passwd")
        );
    }
}
