//! `{{name}}`: an `audit` defense plugin (generated from the Rust defense template).
//!
//! A template that does not change the model: it checks that the bytes it is given look like an
//! ONNX `ModelProto` and hands them back unchanged, with the report
//! `{"changed": false, "note": "template: replace defend() with your defense"}`.
//!
//! A real defense (fine-pruning, retraining, ...) needs to load, edit and re-export the model; a
//! later SDK version exposes the engine for that. Until then, put your own logic in `defend`.

use audit_sdk::{
    export_plugin, Call, DatasetRef, Defense, Error, Hardened, Plugin, PluginInfo, Result,
};
use serde_json::json;

/// JSON Schema of the parameters: this template takes none.
const PARAMS_SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{}}"#;

/// The plugin. The SDK creates one with `Default` for every call.
#[derive(Debug, Default)]
pub struct PassthroughCheck;

impl Plugin for PassthroughCheck {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "{{name}}",
            version: env!("CARGO_PKG_VERSION"),
            description: "Template defense (onnx-passthrough-check): checks the model is ONNX and \
                          returns it unchanged; it does not change the model",
            params_schema: PARAMS_SCHEMA,
            capabilities: audit_sdk::abi::AUDIT_CAP_NEEDS_MODEL,
        }
    }
}

/// Checks that `bytes` start like a serialized ONNX `ModelProto`: the first field key must be one
/// of its fields with the right wire type (a model exported by PyTorch starts with 0x08,
/// `ir_version`).
fn check_onnx(bytes: &[u8]) -> Result<()> {
    let Some(&first) = bytes.first() else {
        return Err(Error::invalid(
            "the model is empty: pass an ONNX model (--model MODEL.onnx)",
        ));
    };
    let not_onnx = || {
        Error::invalid(format!(
            "the model ({} bytes, first byte 0x{first:02x}) does not look like an ONNX ModelProto",
            bytes.len()
        ))
    };
    // The key is a varint; the field numbers of ModelProto need at most two bytes.
    let key = if first & 0x80 == 0 {
        u32::from(first)
    } else {
        match bytes.get(1) {
            Some(&second) if second & 0x80 == 0 => u32::from(first & 0x7f) | u32::from(second) << 7,
            _ => return Err(not_onnx()),
        }
    };
    let (field, wire_type) = (key >> 3, key & 7);
    let expected = match field {
        // ir_version, model_version: varint.
        1 | 5 => 0,
        // producer_name, producer_version, domain, doc_string, graph, opset_import,
        // metadata_props, training_info, functions, configuration: length-delimited.
        2 | 3 | 4 | 6 | 7 | 8 | 14 | 20 | 25 | 26 => 2,
        _ => return Err(not_onnx()),
    };
    if wire_type != expected {
        return Err(not_onnx());
    }
    Ok(())
}

impl Defense for PassthroughCheck {
    fn defend(
        &self,
        call: &Call<'_>,
        model: &[u8],
        _train: Option<&DatasetRef<'_>>,
        _clean: Option<&DatasetRef<'_>>,
    ) -> Result<Hardened> {
        check_onnx(model)?;
        call.host.check_cancelled()?;
        call.host.info(&format!(
            "model of {} bytes returned unchanged (template)",
            model.len()
        ));
        Ok(Hardened {
            model: model.to_vec(),
            dropped: Vec::new(),
            report: json!({
                "changed": false,
                "note": "template: replace defend() with your defense",
            }),
        })
    }
}

export_plugin!(defense: PassthroughCheck);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_onnx_and_rejects_the_rest() {
        assert!(check_onnx(&[0x08, 0x07, 0x12, 0x00]).is_ok());
        assert!(check_onnx(&[0x3a, 0x00]).is_ok());
        assert!(check_onnx(b"").is_err());
        assert!(check_onnx(b"PK\x03\x04").is_err());
        assert!(check_onnx(&[0x09]).is_err());
    }
}
