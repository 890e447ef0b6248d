//! Errors of the engine; each names what the user needs (op, node, opset, file, tensor).

/// An engine error.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error("not a valid ONNX model: {0}")]
    Parse(String),
    #[error("unsupported op {op_type} (node `{node}`, opset {opset}){}", if .more > &0 { format!(" and {} more unsupported node(s): run `audit inspect` for the list", .more) } else { String::new() })]
    Unsupported {
        op_type: String,
        node: String,
        opset: i64,
        more: usize,
    },
    #[error("node `{node}` ({op_type}): {message}")]
    Node {
        node: String,
        op_type: String,
        message: String,
    },
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    /// The caller's cancel hook said stop (training checks it every step).
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Other(String),
}

impl NnError {
    pub(crate) fn node(node: &str, op_type: &str, message: impl Into<String>) -> Self {
        NnError::Node {
            node: node.to_string(),
            op_type: op_type.to_string(),
            message: message.into(),
        }
    }
    pub(crate) fn tensor(name: &str, message: impl Into<String>) -> Self {
        NnError::Tensor {
            name: name.to_string(),
            message: message.into(),
        }
    }
}

impl From<tch::TchError> for NnError {
    fn from(e: tch::TchError) -> Self {
        NnError::Other(format!("libtorch: {e}"))
    }
}

/// Result of the engine.
pub type Result<T> = std::result::Result<T, NnError>;
