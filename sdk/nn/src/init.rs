//! Fresh initialisation of a loaded graph's parameters, the way PyTorch initialises its layers:
//! Conv/Gemm/MatMul weights kaiming-uniform with a = sqrt(5) (bound 1/sqrt(fan_in)), biases
//! uniform in +-1/sqrt(fan_in), normalization scales 1 and shifts 0, BN statistics 0 and 1.

use tch::{no_grad, Tensor};

use crate::model::{Model, ParamRole};

impl Model {
    fn param_of(&self, value: Option<usize>) -> Option<usize> {
        let v = value?;
        self.params
            .iter()
            .position(|p| p.value == v && p.role != ParamRole::Constant)
    }

    /// Re-initialises every trainable parameter and BN statistic in place (the tensors stay the
    /// same objects, so an optimiser built afterwards or before keeps pointing at them).
    pub fn reinitialize(&self, seed: u64) {
        tch::manual_seed(seed as i64);
        let uniform = |t: &Tensor, bound: f64| {
            let _ = t.shallow_clone().uniform_(-bound, bound);
        };
        let fill = |t: &Tensor, v: f64| {
            let _ = t.shallow_clone().fill_(v);
        };
        no_grad(|| {
            for (ni, n) in self.nodes.iter().enumerate() {
                let slot = |s: usize| {
                    self.param_of(n.inputs.get(s).copied().flatten())
                        .map(|i| &self.params[i].tensor)
                };
                match n.op_type.as_str() {
                    "Conv" | "ConvTranspose" | "Gemm" | "MatMul" => {
                        let Some(w) = slot(1) else { continue };
                        let s = w.size();
                        let trans_b = self
                            .proto
                            .graph
                            .as_ref()
                            .map(|g| &g.node[self.nodes[ni].proto_index])
                            .and_then(|nd| nd.attribute.iter().find(|a| a.name() == "transB"))
                            .map(|a| a.i() != 0)
                            .unwrap_or(false);
                        let fan_in: i64 = match n.op_type.as_str() {
                            "Conv" => s[1..].iter().product(),
                            "ConvTranspose" => s[0] * s[2..].iter().product::<i64>(),
                            "Gemm" if trans_b => s[1],
                            _ => s[0],
                        };
                        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                        uniform(w, bound);
                        if let Some(b) = slot(2) {
                            uniform(b, bound);
                        }
                    }
                    "BatchNormalization" | "InstanceNormalization" | "LayerNormalization" => {
                        if let Some(t) = slot(1) {
                            fill(t, 1.0);
                        }
                        if let Some(t) = slot(2) {
                            fill(t, 0.0);
                        }
                        if let Some(t) = slot(3) {
                            fill(t, 0.0);
                        }
                        if let Some(t) = slot(4) {
                            fill(t, 1.0);
                        }
                    }
                    "PRelu" => {
                        if let Some(t) = slot(1) {
                            fill(t, 0.25);
                        }
                    }
                    _ => {}
                }
            }
        });
    }
}
