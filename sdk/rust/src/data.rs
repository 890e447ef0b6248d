//! Safe views of the tensors and datasets the host lends, and owned tensors a plugin returns.

use crate::{abi, Error, Result};

/// Element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    U8,
    F32,
    I64,
}

impl Dtype {
    /// From the ABI code.
    pub fn from_code(code: u32) -> Option<Dtype> {
        match code {
            abi::AUDIT_DTYPE_U8 => Some(Dtype::U8),
            abi::AUDIT_DTYPE_F32 => Some(Dtype::F32),
            abi::AUDIT_DTYPE_I64 => Some(Dtype::I64),
            _ => None,
        }
    }
    /// The ABI code.
    pub fn code(self) -> u32 {
        match self {
            Dtype::U8 => abi::AUDIT_DTYPE_U8,
            Dtype::F32 => abi::AUDIT_DTYPE_F32,
            Dtype::I64 => abi::AUDIT_DTYPE_I64,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        abi::dtype_size(self.code())
    }
}

/// A borrowed, C-contiguous tensor, valid for the duration of the call.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub dtype: Dtype,
    pub shape: &'a [i64],
    bytes: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// Checks an ABI tensor view (dtype, ndim, sizes, null pointer) and borrows it.
    ///
    /// # Safety
    /// `t.data` must point to `t.byte_len` readable bytes that outlive `'a`.
    pub unsafe fn from_abi(t: &'a abi::AuditTensor, what: &str) -> Result<Option<TensorRef<'a>>> {
        if t.ndim == 0 && t.byte_len == 0 {
            return Ok(None);
        }
        let dtype =
            Dtype::from_code(t.dtype).ok_or_else(|| Error::invalid(format!("{what}: unknown dtype {}", t.dtype)))?;
        if t.ndim as usize > abi::AUDIT_MAX_DIMS {
            return Err(Error::invalid(format!(
                "{what}: ndim {} exceeds {}",
                t.ndim,
                abi::AUDIT_MAX_DIMS
            )));
        }
        let shape = &t.shape[..t.ndim as usize];
        let mut elems: usize = 1;
        for &d in shape {
            let d =
                usize::try_from(d).map_err(|_| Error::invalid(format!("{what}: negative dimension in {shape:?}")))?;
            elems = elems
                .checked_mul(d)
                .ok_or_else(|| Error::invalid(format!("{what}: shape {shape:?} overflows")))?;
        }
        let expected = elems
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::invalid(format!("{what}: too large")))?;
        if expected != t.byte_len {
            return Err(Error::invalid(format!(
                "{what}: byte_len {} does not match shape {shape:?} ({expected} bytes)",
                t.byte_len
            )));
        }
        if t.byte_len > 0 && t.data.is_null() {
            return Err(Error::invalid(format!("{what}: null data pointer")));
        }
        let align = dtype.size();
        if t.byte_len > 0 && !(t.data as usize).is_multiple_of(align) {
            return Err(Error::invalid(format!(
                "{what}: data pointer not aligned to {align} bytes"
            )));
        }
        let bytes = if t.byte_len == 0 {
            &[][..]
        } else {
            // SAFETY: checked non-null; the caller guarantees `byte_len` readable bytes.
            unsafe { std::slice::from_raw_parts(t.data as *const u8, t.byte_len) }
        };
        Ok(Some(TensorRef { dtype, shape, bytes }))
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// As `u8` elements.
    pub fn as_u8(&self) -> Result<&'a [u8]> {
        match self.dtype {
            Dtype::U8 => Ok(self.bytes),
            other => Err(Error::invalid(format!("expected u8 tensor, got {other:?}"))),
        }
    }

    /// As `f32` elements.
    pub fn as_f32(&self) -> Result<&'a [f32]> {
        match self.dtype {
            Dtype::F32 if self.bytes.is_empty() => Ok(&[]),
            // SAFETY: alignment and length were checked in `from_abi`; every bit pattern is an f32.
            Dtype::F32 => Ok(unsafe { std::slice::from_raw_parts(self.bytes.as_ptr() as *const f32, self.numel()) }),
            other => Err(Error::invalid(format!("expected f32 tensor, got {other:?}"))),
        }
    }

    /// As `i64` elements.
    pub fn as_i64(&self) -> Result<&'a [i64]> {
        match self.dtype {
            Dtype::I64 if self.bytes.is_empty() => Ok(&[]),
            // SAFETY: alignment and length were checked in `from_abi`; every bit pattern is an i64.
            Dtype::I64 => Ok(unsafe { std::slice::from_raw_parts(self.bytes.as_ptr() as *const i64, self.numel()) }),
            other => Err(Error::invalid(format!("expected i64 tensor, got {other:?}"))),
        }
    }

    /// Copies into an owned tensor.
    pub fn to_owned(&self) -> Tensor {
        let data = match self.dtype {
            Dtype::U8 => TensorData::U8(self.bytes.to_vec()),
            Dtype::F32 => TensorData::F32(self.as_f32().map(<[f32]>::to_vec).unwrap_or_default()),
            Dtype::I64 => TensorData::I64(self.as_i64().map(<[i64]>::to_vec).unwrap_or_default()),
        };
        Tensor {
            shape: self.shape.to_vec(),
            data,
        }
    }
}

/// A borrowed labelled image set: images NCHW (u8 0..255 or f32 0..1), labels in 0..num_classes.
#[derive(Debug, Clone, Copy)]
pub struct DatasetRef<'a> {
    pub images: TensorRef<'a>,
    pub labels: &'a [i64],
    pub num_classes: usize,
}

impl<'a> DatasetRef<'a> {
    /// Checks and borrows an ABI dataset; `None` when absent.
    ///
    /// # Safety
    /// The tensors' pointers must be valid for `'a` (ABI contract).
    pub unsafe fn from_abi(d: &'a abi::AuditDataset, what: &str) -> Result<Option<DatasetRef<'a>>> {
        // SAFETY: forwarded.
        let images = unsafe { TensorRef::from_abi(&d.images, &format!("{what}.images"))? };
        let Some(images) = images else { return Ok(None) };
        if images.shape.len() != 4 {
            return Err(Error::invalid(format!(
                "{what}.images: expected NCHW, got shape {:?}",
                images.shape
            )));
        }
        if images.dtype == Dtype::I64 {
            return Err(Error::invalid(format!("{what}.images: must be u8 or f32")));
        }
        // SAFETY: forwarded.
        let labels = unsafe { TensorRef::from_abi(&d.labels, &format!("{what}.labels"))? };
        let labels = match labels {
            Some(l) => l.as_i64()?,
            None => &[][..],
        };
        if labels.len() as i64 != images.shape[0] {
            return Err(Error::invalid(format!(
                "{what}: {} labels for {} images",
                labels.len(),
                images.shape[0]
            )));
        }
        let num_classes = d.num_classes as usize;
        if let Some(bad) = labels.iter().find(|&&l| l < 0 || l as usize >= num_classes) {
            return Err(Error::invalid(format!("{what}: label {bad} outside 0..{num_classes}")));
        }
        Ok(Some(DatasetRef {
            images,
            labels,
            num_classes,
        }))
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// (channels, height, width).
    pub fn chw(&self) -> (usize, usize, usize) {
        let s = self.images.shape;
        (s[1] as usize, s[2] as usize, s[3] as usize)
    }
}

/// An owned tensor's elements.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    U8(Vec<u8>),
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// An owned, C-contiguous tensor a plugin returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<i64>,
    pub data: TensorData,
}

impl Tensor {
    /// Element type.
    pub fn dtype(&self) -> Dtype {
        match self.data {
            TensorData::U8(_) => Dtype::U8,
            TensorData::F32(_) => Dtype::F32,
            TensorData::I64(_) => Dtype::I64,
        }
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        match &self.data {
            TensorData::U8(v) => v.len(),
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }
    pub(crate) fn as_ptr_len(&self) -> (*const u8, usize) {
        match &self.data {
            TensorData::U8(v) => (v.as_ptr(), v.len()),
            TensorData::F32(v) => (v.as_ptr() as *const u8, v.len() * 4),
            TensorData::I64(v) => (v.as_ptr() as *const u8, v.len() * 8),
        }
    }
}
