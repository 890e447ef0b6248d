//! What the sample-level detectors (Spectral Signatures `ss`, Activation Clustering `ac`) share:
//! the penultimate features of a whole dataset (the input of the model's output layer, the
//! representation the classifier head reads), computed in batches on the device; the samples of
//! each class as index tensors; the principal components of a set of features; and the MAD
//! anomaly index (median absolute deviation) over per-class statistics.

use audit_nn::tch::{self, Kind, Tensor};
use audit_nn::train::{DeviceData, Preprocess};
use audit_nn::{Mode, Model};
use audit_sdk::{Call, DatasetRef, Error, Result};

use crate::nn_err;

/// The consistency constant of the median absolute deviation (normal data).
pub const MAD_CONSISTENCY: f64 = 1.4826;

/// Id of the value the model's output layer reads: the penultimate features. The output layer is
/// the last layer with neurons (Conv, Gemm, MatMul) from which no other such layer is reachable
/// (`audit_nn::Layer::is_output`; a NiN's class-map conv included), as NONE's class-wise split
/// reads it.
pub fn penultimate_value(model: &Model) -> Result<usize> {
    model
        .layers()
        .into_iter()
        .rev()
        .find(|l| l.is_output)
        .and_then(|l| l.input)
        .ok_or_else(|| {
            Error::invalid("the model has no output layer (Conv, Gemm or MatMul with weights) to read features before")
        })
}

/// The penultimate features of every sample of `data`, flattened per sample: [N, D] float on
/// the device. One eval-mode pass in batches of `batch`, no gradients; between batches the
/// host's cancel flag is polled and progress reported under `label` (neither reads the device).
pub fn penultimate_features(
    call: &Call<'_>,
    model: &Model,
    data: &DeviceData,
    pre: &Preprocess,
    batch: i64,
    label: &str,
) -> Result<Tensor> {
    let value = penultimate_value(model)?;
    let n = data.len();
    let batch = batch.max(1);
    let steps = ((n + batch - 1) / batch) as u64;
    let mut parts = Vec::with_capacity(steps as usize);
    tch::no_grad(|| -> Result<()> {
        let mut s = 0;
        let mut step = 0;
        while s < n {
            call.host.check_cancelled()?;
            let k = (n - s).min(batch);
            let x = pre.apply(&data.x.narrow(0, s, k));
            let (_, taps) = model.forward_with_taps(&[&x], Mode::Eval, &[value]).map_err(nn_err)?;
            parts.push(taps[0].to_kind(Kind::Float).flatten(1, -1));
            s += k;
            step += 1;
            call.host.progress(label, step, steps);
        }
        Ok(())
    })?;
    if parts.is_empty() {
        return Err(Error::invalid("the data has no samples"));
    }
    Ok(Tensor::cat(&parts, 0))
}

/// What a sample-level detector reads from the training set: its penultimate features, class by
/// class.
pub struct ClassFeatures {
    /// The device everything lives on.
    pub device: tch::Device,
    pub n: i64,
    /// Number of classes (the model's outputs).
    pub k: i64,
    /// [N, D] float.
    pub features: Tensor,
    /// Per class 0..k, its samples' indices (see [`class_indices`]) and their counts.
    pub per_class: Vec<Tensor>,
    pub sizes: Vec<i64>,
}

/// The common opening of a sample-level detector `name`: the training set (refused when absent
/// or empty), the model loaded frozen on the call's device, the data checked against it, the
/// penultimate features in batches of `batch`, and the samples of each class.
pub fn class_features(
    call: &Call<'_>,
    name: &str,
    model_bytes: &[u8],
    train: Option<&DatasetRef<'_>>,
    batch: i64,
) -> Result<ClassFeatures> {
    let train = train
        .filter(|d| !d.is_empty())
        .ok_or_else(|| Error::invalid(format!("{name} needs the training set (--data DATA)")))?;
    let device = crate::device(call)?;
    let (mut model, pre) = crate::load_model(model_bytes, device, false)?;
    model.set_trainable(false);
    let data = crate::device_data(train, device)?;
    let k = crate::check_fit(&model, &data, &pre, "the training set")?;
    let features = penultimate_features(call, &model, &data, &pre, batch, "penultimate features")?;
    let per_class = class_indices(&data.y, k)?;
    let sizes = per_class.iter().map(|t| t.size()[0]).collect();
    Ok(ClassFeatures {
        device,
        n: data.len(),
        k,
        features,
        per_class,
        sizes,
    })
}

/// The indices (i64, on `y`'s device, ascending) of the samples of each class 0..k: one stable
/// sort of the labels and one read of the class counts (the only host read).
pub fn class_indices(y: &Tensor, k: i64) -> Result<Vec<Tensor>> {
    let order = y.argsort_stable(true, 0, false);
    let counts = Vec::<i64>::try_from(y.bincount::<Tensor>(None, k).to_device(tch::Device::Cpu))
        .map_err(|e| Error::failed(e.to_string()))?;
    let mut out = Vec::with_capacity(k as usize);
    let mut at = 0;
    for &c in counts.iter().take(k as usize) {
        out.push(order.narrow(0, at, c));
        at += c;
    }
    Ok(out)
}

/// The principal components of a set of features.
#[derive(Debug)]
pub struct Principal {
    /// [n, r] (double): the centred samples projected on the top `r` principal directions
    /// (the top right singular vectors of the centred matrix), largest first; each direction's
    /// sign is arbitrary.
    pub scores: Tensor,
    /// [min(n, D)] (double), descending: the squared singular values of the centred matrix (the
    /// eigenvalues of its scatter matrix, not divided by n); their sum is the squared Frobenius
    /// norm of the centred matrix.
    pub eigenvalues: Tensor,
}

/// The top `r` principal components of `x` ([n, D], n >= 1), centred on its mean, in double
/// precision on `x`'s device. The eigendecomposition is of the smaller scatter matrix: `XᵀX`
/// ([D, D]; scores `X V`) when n >= D, else the Gram matrix `XXᵀ` ([n, n]; scores `U sqrt(λ)`,
/// the same values, since `X v = σ u`). `r` is capped at min(n, D).
pub fn principal_components(x: &Tensor, r: i64) -> Principal {
    tch::no_grad(|| {
        let x = x.to_kind(Kind::Double);
        let s = x.size();
        let (n, d) = (s[0], s[1]);
        let x = &x - x.mean_dim(0, true, Kind::Double);
        let r = r.clamp(1, n.min(d).max(1));
        if n >= d {
            let (evals, evecs) = x.tr().matmul(&x).linalg_eigh("L");
            let evals = evals.flip([0]).clamp_min(0.0);
            let top = evecs.narrow(1, d - r, r).flip([1]);
            Principal {
                scores: x.matmul(&top),
                eigenvalues: evals,
            }
        } else {
            let (evals, evecs) = x.matmul(&x.tr()).linalg_eigh("L");
            let evals = evals.flip([0]).clamp_min(0.0);
            let top = evecs.narrow(1, n - r, r).flip([1]);
            Principal {
                scores: top * evals.narrow(0, 0, r).sqrt().unsqueeze(0),
                eigenvalues: evals,
            }
        }
    })
}

/// The median (numpy's: the mean of the two middle values for an even count). None when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The MAD outlier test over per-class statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct MadIndex {
    pub median: f64,
    /// `1.4826 * median(|v - median|)`.
    pub mad: f64,
    /// `(v - median) / mad` per value: positive on the large side (negate it for the small side,
    /// as Neural Cleanse's mask norms are tested).
    pub index: Vec<f64>,
}

/// Anomaly indices of `values`; None when there are fewer than 3 values, one is not finite, or
/// the MAD is 0 (more than half of the values equal: no spread to measure an outlier against).
pub fn mad_index(values: &[f64]) -> Option<MadIndex> {
    if values.len() < 3 || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let med = median(values)?;
    let dev: Vec<f64> = values.iter().map(|v| (v - med).abs()).collect();
    let mad = MAD_CONSISTENCY * median(&dev)?;
    if mad <= 0.0 {
        return None;
    }
    Some(MadIndex {
        median: med,
        mad,
        index: values.iter().map(|v| (v - med) / mad).collect(),
    })
}

/// A tensor's values as f64 on the host (one read).
pub fn to_f64s(t: &Tensor) -> Result<Vec<f64>> {
    Vec::<f64>::try_from(t.to_device(tch::Device::Cpu).to_kind(Kind::Double).flatten(0, -1))
        .map_err(|e| Error::failed(e.to_string()))
}

/// Per-class statistics read to the host at once: `per_class[c]` holds class c's `N` numbers on
/// the device, `None` for a class that was not tested (it stays `None`). One host read for all.
pub fn read_class_stats<const N: usize>(per_class: &[Option<&Tensor>]) -> Result<Vec<Option<[f64; N]>>> {
    let tested: Vec<&Tensor> = per_class.iter().flatten().copied().collect();
    if tested.is_empty() {
        return Ok(vec![None; per_class.len()]);
    }
    let stats = to_f64s(&Tensor::stack(&tested, 0))?;
    if stats.len() != N * tested.len() {
        return Err(Error::failed(format!(
            "per-class statistics: {} numbers for {} classes, expected {N} each",
            stats.len(),
            tested.len()
        )));
    }
    let mut rows = stats.chunks_exact(N);
    Ok(per_class
        .iter()
        .map(|t| {
            t.and_then(|_| rows.next()).map(|r| {
                let mut v = [0.0; N];
                v.copy_from_slice(r);
                v
            })
        })
        .collect())
}

/// A tensor's values as i64 on the host (one read).
pub fn to_i64s(t: &Tensor) -> Result<Vec<i64>> {
    Vec::<i64>::try_from(t.to_device(tch::Device::Cpu).to_kind(Kind::Int64).flatten(0, -1))
        .map_err(|e| Error::failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_stats_come_back_in_place_of_the_tested_classes() {
        let a = Tensor::from_slice(&[1.0f64, 2.0]);
        let b = Tensor::from_slice(&[3.0f64, 4.0]);
        let got = read_class_stats::<2>(&[Some(&a), None, Some(&b)]).unwrap();
        assert_eq!(got, vec![Some([1.0, 2.0]), None, Some([3.0, 4.0])]);
        assert_eq!(read_class_stats::<2>(&[None, None]).unwrap(), vec![None, None]);
        assert!(read_class_stats::<3>(&[Some(&a)]).is_err(), "a wrong count is an error");
    }

    #[test]
    fn the_mad_index_is_the_distance_from_the_median_in_mads() {
        let v = [10.0, 20.0, 22.0, 24.0, 26.0, 28.0, 30.0, 21.0, 25.0, 27.0];
        // median 24.5; deviations' median 3.0; MAD 1.4826 * 3 = 4.4478 (worked by hand).
        let a = mad_index(&v).unwrap();
        assert_eq!(a.median, 24.5);
        assert!((a.mad - 4.4478).abs() < 1e-12, "{a:?}");
        assert!((a.index[0] + 14.5 / 4.4478).abs() < 1e-12, "the small side is negative");
        assert!((a.index[6] - 5.5 / 4.4478).abs() < 1e-12);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
        assert_eq!(mad_index(&[5.0, 5.0, 5.0, 1.0]), None);
        assert_eq!(mad_index(&[1.0, 2.0]), None);
        assert_eq!(mad_index(&[1.0, f64::NAN, 2.0, 3.0]), None);
    }

    #[test]
    fn class_indices_list_each_class_in_order() {
        let y = Tensor::from_slice(&[2i64, 0, 2, 1, 0, 2]);
        let idx = class_indices(&y, 4).unwrap();
        let got: Vec<Vec<i64>> = idx.iter().map(|t| to_i64s(t).unwrap()).collect();
        assert_eq!(got, vec![vec![1, 4], vec![3], vec![0, 2, 5], vec![]]);
    }

    /// Both branches (n >= D and n < D) give the centred data's top principal projections and the
    /// squared singular values (checked against an SVD).
    #[test]
    fn principal_components_match_the_svd_of_the_centred_data() {
        tch::manual_seed(1);
        for (n, d) in [(40, 6), (5, 12)] {
            let x = Tensor::randn([n, d], (Kind::Double, tch::Device::Cpu))
                * Tensor::from_slice(&(1..=d).map(|i| i as f64).collect::<Vec<_>>());
            let p = principal_components(&x, 3);
            let c = &x - x.mean_dim(0, true, Kind::Double);
            let (_, s, v) = c.svd(true, true);
            let sq = to_f64s(&s.square()).unwrap();
            let ev = to_f64s(&p.eigenvalues).unwrap();
            for (a, b) in sq.iter().zip(&ev) {
                assert!((a - b).abs() < 1e-8 * sq[0], "{sq:?} vs {ev:?}");
            }
            let want = c.matmul(&v.narrow(1, 0, 3)).abs();
            let diff = (p.scores.abs() - want).abs().max().double_value(&[]);
            assert!(diff < 1e-8, "n {n} d {d}: {diff}");
        }
    }
}
