//! The `poison` and `trigger` flow shared by every attack: resolve parameters, choose samples,
//! stamp, relabel, report.

use audit_sdk::serde_json::{Map, Value};
use audit_sdk::{Call, DatasetRef, Params, Poisoned, Result, Triggered};

use crate::image::{stamp_in_place, Dims, Stamp};
use crate::params::{CommonParams, Mode};
use crate::select::plan;

/// A call's resolved parameters, checked against its data.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Every parameter of the schema, defaults filled.
    pub params: Params,
    /// The common parameters.
    pub common: CommonParams,
    /// The images' dims.
    pub dims: Dims,
}

impl Setup {
    /// Resolves `call.params` against `schema` and validates them against `data`.
    pub fn new(call: &Call<'_>, data: &DatasetRef<'_>, schema: &str) -> Result<Setup> {
        let params = call.params.resolve(schema)?;
        let common = CommonParams::from_params(&params)?;
        common.validate(data)?;
        Ok(Setup {
            params,
            common,
            dims: Dims::of(data),
        })
    }
}

fn report(setup: &Setup, stamp: &impl Stamp, n_total: usize) -> Map<String, Value> {
    let mut r = setup.common.report();
    r.extend(stamp.report());
    r.insert("n_total".into(), n_total.into());
    r
}

/// Poisons `data`: chooses `round(effective_rate * N)` samples with the call's seed, stamps them,
/// and relabels them (unless `clean_label`, where only target-class samples are chosen and labels
/// stay). The report holds the effective parameters, `n_poisoned`, `n_requested`, `n_candidates`,
/// `n_total`, and a `note` (also logged as a warning) when fewer samples were eligible than asked.
pub fn poison_with<S: Stamp>(
    call: &Call<'_>,
    data: &DatasetRef<'_>,
    setup: &Setup,
    stamp: &S,
    clean_label: bool,
) -> Result<Poisoned> {
    let common = &setup.common;
    let plan = plan(common, data.labels, call.seed, clean_label);
    let mut images = data.images.to_owned();
    stamp_in_place(call, &mut images, &plan.indices, "poison", stamp)?;
    let mut labels = data.labels.to_vec();
    if !clean_label {
        for &i in &plan.indices {
            labels[i] = common.target_label(labels[i], data.num_classes);
        }
    }
    let mut r = report(setup, stamp, data.len());
    r.insert("n_poisoned".into(), plan.indices.len().into());
    r.insert("n_requested".into(), plan.requested.into());
    r.insert("n_candidates".into(), plan.candidates.into());
    if plan.capped() {
        let eligible = match (clean_label, common.mode) {
            (true, _) => "in the target class",
            (false, Mode::AllToOne) => "outside the target class",
            (false, Mode::AllToAll) => "in the dataset",
        };
        let note = format!(
            "only {} samples are {eligible}: all of them are poisoned instead of the {} the rate asks for",
            plan.candidates, plan.requested
        );
        call.host.warn(&note);
        r.insert("note".into(), note.into());
    }
    Ok(Poisoned {
        images,
        labels,
        indices: plan.indices.iter().map(|&i| i as i64).collect(),
        report: Value::Object(r),
    })
}

/// Stamps `stamp` on every image of `data` and returns the labels the attack wants: the target
/// (all-to-one) or `(y + 1) mod K` (all-to-all).
pub fn trigger_with<S: Stamp>(call: &Call<'_>, data: &DatasetRef<'_>, setup: &Setup, stamp: &S) -> Result<Triggered> {
    let mut images = data.images.to_owned();
    let all: Vec<usize> = (0..data.len()).collect();
    stamp_in_place(call, &mut images, &all, "trigger", stamp)?;
    let target_labels = data
        .labels
        .iter()
        .map(|&y| setup.common.target_label(y, data.num_classes))
        .collect();
    Ok(Triggered {
        images,
        target_labels,
        report: Value::Object(report(setup, stamp, data.len())),
    })
}
