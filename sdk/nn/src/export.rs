//! Export: the trained parameters written back into the original ModelProto (same graph, names,
//! dtypes, opset), plus `audit.*` metadata. Parity against onnxruntime is checked by the caller
//! (the toolkit owns the inference runtimes).

use std::collections::HashMap;

use prost::Message;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::model::{Model, ParamRole};
use crate::proto::{tensor_proto::DataLocation, StringStringEntryProto};
use crate::tensor::tensor_to_proto;

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl Model {
    /// The model with its current parameters and BN statistics, as ONNX bytes. Initializers are
    /// written as raw data with their original element type (external data is inlined).
    /// `metadata` entries replace existing keys of the same name.
    pub fn export(&self, metadata: &[(String, String)]) -> Result<Vec<u8>> {
        let mut proto = self.proto.clone();
        let by_name: HashMap<&str, usize> = self
            .params
            .iter()
            .enumerate()
            .filter(|(_, p)| p.role != ParamRole::Constant)
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        if let Some(g) = proto.graph.as_mut() {
            for init in &mut g.initializer {
                let Some(&i) = by_name.get(init.name()) else { continue };
                let p = &self.params[i];
                let fresh = tensor_to_proto(&p.name, &p.tensor.detach(), p.data_type)?;
                init.raw_data = fresh.raw_data;
                init.float_data.clear();
                init.double_data.clear();
                init.int32_data.clear();
                init.int64_data.clear();
                init.external_data.clear();
                init.data_location = Some(DataLocation::Default as i32);
            }
        }
        for (k, v) in metadata {
            proto.metadata_props.retain(|e| e.key() != k);
            proto.metadata_props.push(StringStringEntryProto {
                key: Some(k.clone()),
                value: Some(v.clone()),
            });
        }
        Ok(proto.encode_to_vec())
    }

    /// A metadata value of the original model.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.proto
            .metadata_props
            .iter()
            .find(|e| e.key() == key)
            .map(|e| e.value())
    }
}
