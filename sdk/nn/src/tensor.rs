//! TensorProto <-> tch::Tensor, with the checks that keep bad files from panicking or allocating
//! absurd amounts: dims must be sane, data must be as long as the shape says, external data must
//! stay inside the model's folder.

use std::path::{Component, Path};

use tch::{Kind, Tensor};

use crate::error::{NnError, Result};
use crate::proto::{tensor_proto::DataLocation, tensor_proto::DataType, TensorProto};

/// Most elements a single tensor may have (4 Gi elements).
const MAX_ELEMS: u64 = 1 << 32;

/// The tch kind of an ONNX element type.
pub fn kind_of(data_type: i32) -> Option<Kind> {
    Some(match DataType::try_from(data_type).ok()? {
        DataType::Float => Kind::Float,
        DataType::Double => Kind::Double,
        DataType::Float16 => Kind::Half,
        DataType::Bfloat16 => Kind::BFloat16,
        DataType::Int64 => Kind::Int64,
        DataType::Int32 => Kind::Int,
        DataType::Int16 => Kind::Int16,
        DataType::Int8 => Kind::Int8,
        DataType::Uint8 => Kind::Uint8,
        DataType::Bool => Kind::Bool,
        _ => return None,
    })
}

/// The ONNX element type of a tch kind.
pub fn data_type_of(kind: Kind) -> Option<i32> {
    Some(match kind {
        Kind::Float => DataType::Float,
        Kind::Double => DataType::Double,
        Kind::Half => DataType::Float16,
        Kind::BFloat16 => DataType::Bfloat16,
        Kind::Int64 => DataType::Int64,
        Kind::Int => DataType::Int32,
        Kind::Int16 => DataType::Int16,
        Kind::Int8 => DataType::Int8,
        Kind::Uint8 => DataType::Uint8,
        Kind::Bool => DataType::Bool,
        _ => return None,
    } as i32)
}

/// Checked shape of a tensor proto.
pub fn checked_shape(name: &str, dims: &[i64]) -> Result<(Vec<i64>, u64)> {
    let mut n: u64 = 1;
    for &d in dims {
        if d < 0 {
            return Err(NnError::tensor(name, format!("negative dimension in {dims:?}")));
        }
        n = n.checked_mul(d as u64).filter(|&n| n <= MAX_ELEMS).ok_or_else(|| {
            NnError::tensor(
                name,
                format!("absurd dimensions {dims:?} (more than {MAX_ELEMS} elements)"),
            )
        })?;
    }
    Ok((dims.to_vec(), n))
}

fn external_bytes(t: &TensorProto, base_dir: Option<&Path>, need: usize) -> Result<Vec<u8>> {
    let name = t.name();
    let mut location = None;
    let (mut offset, mut length) = (0u64, None);
    for kv in &t.external_data {
        match kv.key() {
            "location" => location = Some(kv.value().to_string()),
            "offset" => {
                offset = kv
                    .value()
                    .parse()
                    .map_err(|_| NnError::tensor(name, "external data offset is not a number"))?
            }
            "length" => {
                length = Some(
                    kv.value()
                        .parse::<u64>()
                        .map_err(|_| NnError::tensor(name, "external data length is not a number"))?,
                )
            }
            _ => {}
        }
    }
    let location = location.ok_or_else(|| NnError::tensor(name, "external data without a location"))?;
    let rel = Path::new(&location);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(NnError::tensor(
            name,
            format!("external data location `{location}` leaves the model's folder (absolute or with ..): refused"),
        ));
    }
    let base =
        base_dir.ok_or_else(|| NnError::tensor(name, "external data, but the model was not loaded from a file"))?;
    let path = base.join(rel);
    let canon_base =
        std::fs::canonicalize(base).map_err(|e| NnError::tensor(name, format!("{}: {e}", base.display())))?;
    let canon = std::fs::canonicalize(&path)
        .map_err(|e| NnError::tensor(name, format!("external data {}: {e}", path.display())))?;
    if !canon.starts_with(&canon_base) {
        return Err(NnError::tensor(
            name,
            format!(
                "external data {} resolves outside the model's folder: refused",
                path.display()
            ),
        ));
    }
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(&canon).map_err(|e| NnError::tensor(name, format!("{}: {e}", canon.display())))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    if let Some(len) = length.filter(|&l| l != need as u64) {
        return Err(NnError::tensor(
            name,
            format!(
                "external data {}: its length field says {len} bytes, but the tensor's shape and type need {need}",
                canon.display()
            ),
        ));
    }
    if offset.checked_add(need as u64).is_none_or(|end| end > size) {
        return Err(NnError::tensor(
            name,
            format!(
                "external data {}: needs {need} bytes at offset {offset} (up to byte {}), but the file has {size} bytes",
                canon.display(),
                offset.saturating_add(need as u64)
            ),
        ));
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| NnError::tensor(name, e.to_string()))?;
    let mut buf = vec![0u8; need];
    f.read_exact(&mut buf)
        .map_err(|e| NnError::tensor(name, e.to_string()))?;
    Ok(buf)
}

/// The bytes of an external-data tensor, read from `base_dir` (the model's folder) with the
/// checks of [`tensor_from_proto`]: sane shape, a location inside the folder, a file long enough.
pub(crate) fn external_data(t: &TensorProto, base_dir: &Path) -> Result<Vec<u8>> {
    let name = t.name();
    let kind = kind_of(t.data_type()).ok_or_else(|| {
        NnError::tensor(
            name,
            format!("unsupported element type {} for external data", t.data_type()),
        )
    })?;
    let (_, n) = checked_shape(name, &t.dims)?;
    let need = (n as usize)
        .checked_mul(kind.elt_size_in_bytes())
        .filter(|&b| b as u64 <= crate::model::MAX_PROTO_BYTES)
        .ok_or_else(|| {
            NnError::tensor(
                name,
                format!(
                    "external data of shape {:?} passes protobuf's 2 GiB limit for one model",
                    t.dims
                ),
            )
        })?;
    external_bytes(t, Some(base_dir), need)
}

fn typed_bytes(t: &TensorProto, kind: Kind, n: usize) -> Option<Vec<u8>> {
    let out: Vec<u8> = match kind {
        Kind::Float if t.float_data.len() == n => t.float_data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Kind::Double if t.double_data.len() == n => t.double_data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Kind::Int64 if t.int64_data.len() == n => t.int64_data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Kind::Int if t.int32_data.len() == n => t.int32_data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Kind::Int16 if t.int32_data.len() == n => t.int32_data.iter().flat_map(|&x| (x as i16).to_le_bytes()).collect(),
        Kind::Half | Kind::BFloat16 if t.int32_data.len() == n => {
            t.int32_data.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect()
        }
        Kind::Int8 | Kind::Uint8 | Kind::Bool if t.int32_data.len() == n => {
            t.int32_data.iter().map(|&x| x as u8).collect()
        }
        _ => return None,
    };
    Some(out)
}

/// Decodes a TensorProto (raw, typed or external data) into a CPU tensor.
pub fn tensor_from_proto(t: &TensorProto, base_dir: Option<&Path>) -> Result<Tensor> {
    let name = t.name();
    let kind = kind_of(t.data_type()).ok_or_else(|| {
        let dt = DataType::try_from(t.data_type())
            .map(|d| d.as_str_name().to_string())
            .unwrap_or_else(|_| t.data_type().to_string());
        NnError::tensor(name, format!("unsupported element type {dt}"))
    })?;
    let (shape, n) = checked_shape(name, &t.dims)?;
    let n = n as usize;
    let need = n * kind.elt_size_in_bytes();
    let bytes = if t.data_location() == DataLocation::External {
        external_bytes(t, base_dir, need)?
    } else if let Some(raw) = &t.raw_data {
        if raw.len() != need {
            return Err(NnError::tensor(
                name,
                format!(
                    "raw data is {} bytes, shape {shape:?} of {kind:?} needs {need}",
                    raw.len()
                ),
            ));
        }
        raw.clone()
    } else {
        typed_bytes(t, kind, n).ok_or_else(|| {
            NnError::tensor(
                name,
                format!("data is shorter than its shape {shape:?} ({n} {kind:?} elements)"),
            )
        })?
    };
    Ok(Tensor::f_from_data_size(&bytes, &shape, kind)?)
}

/// Little-endian bytes of a tensor (copied to the CPU).
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let n = t.numel();
    let mut out = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut out, n)?;
    Ok(out)
}

/// Encodes `t` as a TensorProto of element type `data_type` (converting the kind if needed),
/// with raw data.
pub fn tensor_to_proto(name: &str, t: &Tensor, data_type: i32) -> Result<TensorProto> {
    let kind =
        kind_of(data_type).ok_or_else(|| NnError::tensor(name, format!("cannot write element type {data_type}")))?;
    let t = t.to_kind(kind);
    Ok(TensorProto {
        name: Some(name.to_string()),
        data_type: Some(data_type),
        dims: t.size(),
        raw_data: Some(tensor_bytes(&t)?),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(dims: Vec<i64>, floats: Vec<f32>) -> TensorProto {
        TensorProto {
            name: Some("w".into()),
            data_type: Some(DataType::Float as i32),
            dims,
            float_data: floats,
            ..Default::default()
        }
    }

    #[test]
    fn round_trips_and_checks_lengths() {
        let t = tensor_from_proto(&proto(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]), None).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(),
            vec![1.0, 2.0, 3.0, 4.0]
        );
        let p = tensor_to_proto("w", &t, DataType::Float as i32).unwrap();
        let back = tensor_from_proto(&p, None).unwrap();
        assert!(back.equal(&t));
        let e = tensor_from_proto(&proto(vec![3, 2], vec![1.0]), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`w`") && e.contains("shorter"), "{e}");
        let e = tensor_from_proto(&proto(vec![1 << 40, 1 << 40], vec![]), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("absurd"), "{e}");
        let mut raw = proto(vec![4], vec![]);
        raw.raw_data = Some(vec![0; 7]);
        assert!(tensor_from_proto(&raw, None)
            .unwrap_err()
            .to_string()
            .contains("raw data is 7 bytes"));
    }

    #[test]
    fn external_data_stays_inside_the_model_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.bin"), 1.5f32.to_le_bytes().repeat(4)).unwrap();
        let ext = |loc: &str| {
            let mut p = proto(vec![4], vec![]);
            p.data_location = Some(DataLocation::External as i32);
            p.external_data = vec![crate::proto::StringStringEntryProto {
                key: Some("location".into()),
                value: Some(loc.into()),
            }];
            p
        };
        let t = tensor_from_proto(&ext("w.bin"), Some(dir.path())).unwrap();
        assert_eq!(t.sum(Kind::Float).double_value(&[]), 6.0);
        for bad in ["../w.bin", "/etc/passwd", "sub/../../w.bin"] {
            let e = tensor_from_proto(&ext(bad), Some(dir.path())).unwrap_err().to_string();
            assert!(e.contains("refused"), "{bad}: {e}");
        }
        let e = tensor_from_proto(&ext("missing.bin"), Some(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.bin"), "{e}");
    }
}
