//! NONE ("Training with More Confidence", Wang et al., NeurIPS 2022) as an `audit` defense plugin.
//!
//! Each round: one eval-mode pass over the training set collects softmax outputs and the
//! per-channel spatial maxima of every monitored layer (vectorised on the device); per layer,
//! neurons whose maximum on confident samples (p > lamda_h) exceeds the mean + 3 std of
//! unconfident samples (p < lamda_l) the most are selected; the samples that drive the top
//! neuron of each layer are split by an exact two-class Jenks break and the upper class is
//! dropped as suspects; the selected neurons are reset; the model is repaired on the rest.
//!
//! The repair is a parameter: `finetune` is the paper's (lr `none_lr`, BN frozen), `retrain`
//! trains a freshly initialised copy of the same graph on the data minus suspects, `unlearn`
//! fine-tunes on the rest while ascending the loss on the suspects.

mod analysis;

use audit_nn::train::{Augment, DeviceData, Optimizer, Preprocess, Schedule, TrainConfig, Trainer};
use audit_nn::{tch, Model};
use audit_plugin_common::samples::{penultimate_features, to_i64s};
use audit_plugin_common::scan::{self, ScanConfig};
use audit_plugin_common::{device, device_data, export_hardened, load_model, nn_err, run_epochs, EpochNotes};
use audit_sdk::{abi, Call, DatasetRef, Defense, Error, Hardened, Plugin, PluginInfo, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

pub use analysis::{
    class_sides, confirm_side, jenks_break, judge_side, mapped_source, other_classes, paper_groups_judged, paper_side,
    paper_suspects_kept, probe_novelty, select_neurons, trigger_sets, ClassProbe, ClassSide, Judge, PaperFilter,
    PaperGroup, PaperWithTargets, SideVerdict,
};

const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{
"preset":{"type":"string","default":"default","enum":["default","paper"],"description":"paper: exactly the paper's algorithm (suspects from one global Jenks split of the top neurons, fine-tune at none_lr with BN frozen for 20 epochs, suspects recomputed each round; reset 5%, lr 1e-4, R 1); default: this toolkit's measured default (suspects also from the class-wise split, retrain)"},
"suspects":{"type":"string","default":"both","enum":["paper","class","both"],"description":"which training samples are dropped: paper (the upper class of one global Jenks split of the summed top-neuron activations), class (per class, the smaller side of a Jenks split of the penultimate features' top principal direction, accepted when a probe that never saw the class spreads it over the other classes; then a trigger detector trained on the side finds the rest of the class's poisoned samples), or both (the class-wise suspects, and the paper's suspects as paper_with_targets and paper_filter say)"},
"class_probe_epochs":{"type":"integer","default":1,"minimum":1,"description":"suspects=class|both: epochs of each leave-class-out probe (a fresh copy of the graph trained on samples of the other classes only; Adam at retrain_lr)"},
"class_probe_samples":{"type":"integer","default":6000,"minimum":100,"description":"suspects=class|both: training samples of each leave-class-out probe (drawn at random from the other classes; one probe per class)"},
"class_rare":{"type":"number","default":0.05,"minimum":0,"maximum":1,"description":"suspects=class|both: a class is a look-alike of the judged class when the leave-class-out probe gives it at least this share of the class's samples off the side; the other classes are novel"},
"class_novel":{"type":"number","default":0.5,"minimum":0,"maximum":1,"description":"suspects=class|both: a side is poisoned only if the probe sends at least this share of it to novel classes (an all-to-one poisoning's sources come from every class; the class's clean images go to its look-alikes)"},
"class_spread":{"type":"number","default":0.5,"minimum":0,"maximum":1,"description":"suspects=class|both: ... and spreads that part over them with at least this normalised entropy (a clean sub-population that resembles another class goes to that one class)"},
"class_agreement":{"type":"number","default":0.6,"minimum":0,"maximum":1,"description":"suspects=class|both: a candidate side (both thresholds above reached) is accepted when a second leave-class-out probe (another initialisation, other images) names the same class as the first for at least this share of it (poisoned images are genuine images of the other classes; a clean class the probes scatter by guessing gets different guesses); compared as a lower confidence bound, see class_agreement_z"},
"class_novel_z":{"type":"number","default":1.645,"minimum":0,"description":"suspects=class|both: class_novel is compared with the Wilson lower bound of the side's novel share over its size at this one-sided normal quantile (1.645: 95%), as the agreement is, so a side of a few dozen images is not a candidate on a share just above class_novel (24 of 45 gives 0.41); 0: the point estimate (the previous release)"},
"class_agreement_z":{"type":"number","default":1.645,"minimum":0,"description":"suspects=class|both: class_agreement is compared with the Wilson lower bound of the agreement over the side's size at this one-sided normal quantile (1.645: 95%), so a side of a few images that agree by chance is not confirmed (6 of 10 gives 0.35); 0: the point estimate (the previous release)"},
"class_mapped_min":{"type":"integer","default":0,"minimum":0,"description":"suspects=class|both: all-to-all poisoning, opt-in (0: off, the default; measured in the README's NONE section). A class none of whose sides is a candidate, but one of whose sides the probe sends, concentrated (spread below class_spread), to one novel class with a novel share passing class_novel, is confirmed by the second probe as a candidate is (class_agreement); when at least this many classes have such a confirmed side from distinct source classes, each side is cross-checked (a trigger detector trained on the other mapped sides must flag at least half of it: one trigger carries over, clean look-alikes do not; one detector per side), and if enough distinct sources remain they are all accepted and one trigger detector, trained on all their sides, scores every training sample"},
"trigger_epochs":{"type":"integer","default":6,"minimum":0,"description":"suspects=class|both: epochs of the trigger detector trained for each accepted class (a fresh copy of the graph separating the side from other classes' images and the class's core; 0: only the side is dropped)"},
"trigger_negatives":{"type":"integer","default":8000,"minimum":1,"description":"suspects=class|both: images of other classes among the trigger detector's negatives (a second group of negatives, weighed as much, is every second member of the class beyond the median distance from the side; the other half is held out and the share of it the detector flags is reported)"},
"trigger_threshold":{"type":"number","default":0.5,"minimum":0,"maximum":1,"description":"suspects=class|both: a member of an accepted class is a suspect when the trigger detector gives it at least this probability (the side always is)"},
"paper_with_targets":{"type":"string","default":"none","enum":["none","targets","unswept"],"description":"suspects=both, when the class-wise split detected a target class: which of the paper's suspects are dropped as well: none (the class-wise suspects replace them: in a target class the paper's split also takes many clean images, elsewhere only clean ones), targets (those in the target classes), unswept (all except in non-target classes its split swept, the previous default)"},
"paper_filter":{"type":"string","default":"novel","enum":["novel","none"],"description":"suspects=both: novel makes each class's share of the paper's suspects (of a class the split swept, at least half of it, only the members the class's leave-class-out probe sends to classes the whole class goes to less than class_rare) a second candidate side, judged, confirmed and extended by the trigger detector like the split's side; with no detected class, a class's share stays dropped only when it passes the side's novelty tests (class_novel, class_spread; of a swept class only its novel-labelled members): the clean images the global split takes go where their class goes and return to the training; none keeps the paper's suspects as paper_with_targets says"},
"clean_label":{"type":"string","default":"scan","enum":["scan","off"],"description":"suspects=class|both: a check for clean-label poisoning (SIG: triggered images of the target class itself, which the leave-class-out probe sends where the class goes): scan runs SCAn's statistics on the penultimate features, with the clean subset the host lends as the trusted set, and drops the suspicious subgroup of every class whose anomaly index exceeds clean_label_threshold (classes the class-wise split accepted included); it is skipped, with a note, when no clean subset of at least 2 classes is lent; off: no check"},
"clean_label_passes":{"type":"integer","default":3,"minimum":1,"maximum":20,"description":"clean_label=scan: SCAn is run again on the training samples left, at most this many times in all, while a class flagged in the previous pass is still flagged (when the whole class is triggered, the first split takes the images most unlike the clean ones, and the rest is a second identity beside the clean images; classes not flagged before are not judged again)"},
"clean_label_add_clean":{"type":"boolean","default":true,"description":"clean_label=scan: the clean subset's images of the classes the check flagged join the repair's training set, so a class whose training samples were all triggered still has genuine examples (the clean subset is left out of harden's evaluation)"},
"clean_label_threshold":{"type":"number","default":7.38905609893065,"minimum":0,"description":"clean_label=scan: a class is a target when the anomaly index of SCAn's J exceeds this (the SCAn paper's e^2, the scan detector's default)"},
"repair":{"type":"string","default":"retrain","enum":["finetune","retrain","unlearn"],"description":"how to repair after the reset: finetune (paper), retrain a freshly initialised copy on the data minus suspects, or fine-tune while unlearning the suspects"},
"lamda_h":{"type":"number","default":0.9,"minimum":0,"maximum":1,"description":"a sample is confident for class k when p_k > lamda_h"},
"lamda_l":{"type":"number","default":0.1,"minimum":0,"maximum":1,"description":"a sample is unconfident for class k when p_k < lamda_l"},
"max_reset_fraction":{"type":"number","default":0.05,"minimum":0,"maximum":1,"description":"share of each monitored layer's neurons reset per round"},
"none_lr":{"type":"number","default":0.0001,"minimum":0,"description":"learning rate of the paper's fine-tuning after a reset"},
"retrain_optimizer":{"type":"string","default":"adam","enum":["adam","sgd"],"description":"optimiser of repair=retrain (adam converges in few epochs, also for models whose BatchNormalization was folded away)"},
"retrain_push_away":{"type":"number","default":1.0,"minimum":0,"description":"repair=retrain: weight of -log(1 - p_label) on the accepted class-wise sides and the clean-label check's suspects, which stay in the retraining pushed off their label (0: they are only dropped)"},
"retrain_cycles":{"type":"integer","default":3,"minimum":1,"maximum":10,"description":"repair=retrain: the retrain is a cosine cycle of E2 epochs; when, after one, the retrained model fits the kept training samples (eval-mode accuracy) less well than the analysed model did, another cycle of E2 epochs follows (a warm restart), at most this many cycles in all (1: one cycle, whatever the fit; a model without BN, such as a residual network with BN folded, trains slower from scratch than it was trained)"},
"retrain_lr":{"type":"number","default":0.002,"minimum":0,"description":"learning rate of repair=retrain (cosine schedule)"},
"e1_lr":{"type":"number","default":0.1,"minimum":0,"description":"learning rate of the E1 epochs (SGD, x0.1 every 80 epochs, as in the paper)"},
"unlearn_weight":{"type":"number","default":0.2,"minimum":0,"description":"repair=unlearn: weight of the ascending loss on suspects"},
"E1":{"type":"integer","default":0,"minimum":0,"description":"epochs of normal training before the rounds (0 when hardening a trained model; the paper trains 200)"},
"E2":{"type":"integer","default":0,"minimum":0,"description":"repair epochs per round; 0: the repair's default, 20 for finetune and unlearn (the paper's), 6 for retrain (measured: no gain past 5 on Fashion-MNIST)"},
"R":{"type":"integer","default":1,"minimum":1,"maximum":100,"description":"rounds"},
"cumulative_suspects":{"type":"boolean","default":false,"description":"keep excluding the suspects of earlier rounds (the paper recomputes from the full set each round)"},
"batch_size":{"type":"integer","default":128,"minimum":1,"description":"training batch size"},
"layers":{"type":"string","default":"all","enum":["all","conv","dense"],"description":"which layers are monitored: every Conv and hidden Gemm/MatMul, convs only, or dense only"},
"augment":{"type":"boolean","default":false,"description":"random crop and flip during repair (CIFAR-style data)"},
"seed":{"type":"integer","default":0,"minimum":0,"description":"seed of the defense (added to the host's seed)"}}}"#;

/// `preset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Preset {
    Default,
    Paper,
}

/// `suspects`: which training samples are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Suspects {
    Paper,
    Class,
    Both,
}

/// `repair`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Repair {
    Finetune,
    Retrain,
    Unlearn,
}

/// `retrain_optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum RetrainOptimizer {
    Adam,
    Sgd,
}

/// `clean_label`: the clean-label check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum CleanLabel {
    Scan,
    Off,
}

/// `layers`: which layers are monitored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Layers {
    All,
    Conv,
    Dense,
}

/// Parameters (see the schema for meaning).
#[derive(Debug, Clone, Deserialize)]
struct Params {
    preset: Preset,
    suspects: Suspects,
    class_probe_epochs: usize,
    class_probe_samples: i64,
    class_rare: f64,
    class_novel: f64,
    class_spread: f64,
    class_agreement: f64,
    class_agreement_z: f64,
    class_novel_z: f64,
    class_mapped_min: usize,
    trigger_epochs: usize,
    trigger_negatives: i64,
    trigger_threshold: f64,
    paper_with_targets: PaperWithTargets,
    paper_filter: PaperFilter,
    retrain_push_away: f64,
    retrain_cycles: usize,
    clean_label: CleanLabel,
    clean_label_threshold: f64,
    clean_label_passes: usize,
    clean_label_add_clean: bool,
    repair: Repair,
    lamda_h: f64,
    lamda_l: f64,
    max_reset_fraction: f64,
    none_lr: f64,
    retrain_optimizer: RetrainOptimizer,
    retrain_lr: f64,
    e1_lr: f64,
    unlearn_weight: f64,
    #[serde(rename = "E1")]
    e1: usize,
    #[serde(rename = "E2")]
    e2: usize,
    #[serde(rename = "R")]
    r: usize,
    cumulative_suspects: bool,
    batch_size: i64,
    layers: Layers,
    augment: bool,
    seed: u64,
}

impl Params {
    /// The thresholds of the leave-class-out judgement.
    fn judge(&self) -> Judge {
        Judge {
            rare: self.class_rare,
            min_share: self.class_novel,
            min_spread: self.class_spread,
            min_agreement: self.class_agreement,
            agreement_z: self.class_agreement_z,
            novel_z: self.class_novel_z,
        }
    }

    /// `preset=paper` is the paper's algorithm (its suspects, its fine-tuning repair, suspects
    /// recomputed from the full set every round); `E2 = 0` picks the repair's epoch default.
    fn effective(mut self) -> Params {
        if self.preset == Preset::Paper {
            self.repair = Repair::Finetune;
            self.suspects = Suspects::Paper;
            self.cumulative_suspects = false;
            self.clean_label = CleanLabel::Off;
        }
        if self.e2 == 0 {
            self.e2 = if self.repair == Repair::Retrain { 6 } else { 20 };
        }
        self
    }
}

#[derive(Default)]
struct NoneDefense;

impl Plugin for NoneDefense {
    fn info() -> PluginInfo {
        PluginInfo {
            name: "none",
            version: env!("CARGO_PKG_VERSION"),
            description: "NONE (NeurIPS 2022): reset neurons with hyperplane-like confidence, drop the samples driving them, repair",
            params_schema: SCHEMA,
            capabilities: abi::AUDIT_CAP_NEEDS_MODEL
                | abi::AUDIT_CAP_NEEDS_TRAINING_DATA
                | abi::AUDIT_CAP_USES_CLEAN_DATA,
        }
    }
}

/// A stretch of training: `epochs` epochs labelled `phase`; `extra` = (samples, weight, loss)
/// adds, at every step, a batch of those samples with that loss; `class_weights` ([K] float)
/// weighs each sample's cross-entropy by its label (without `extra`).
struct Stretch<'a> {
    epochs: usize,
    phase: &'a str,
    extra: Option<(&'a DeviceData, f64, ExtraLoss)>,
    class_weights: Option<&'a Tensor>,
}

impl<'a> Stretch<'a> {
    /// Plain cross-entropy training.
    fn plain(epochs: usize, phase: &'a str) -> Stretch<'a> {
        Stretch {
            epochs,
            phase,
            extra: None,
            class_weights: None,
        }
    }

    /// Cross-entropy plus, at every step, a batch of `extra`'s samples with its loss.
    fn with_extra(epochs: usize, phase: &'a str, extra: Option<(&'a DeviceData, f64, ExtraLoss)>) -> Stretch<'a> {
        Stretch {
            extra,
            ..Stretch::plain(epochs, phase)
        }
    }
}

/// The loss on the extra samples of a stretch.
#[derive(Clone, Copy)]
enum ExtraLoss {
    /// Ascend the cross-entropy (capped at 5): unlearning.
    Ascend,
    /// Minimise -log(1 - p_label): push the samples off their label, a bounded loss.
    AwayFromLabel,
}

/// Trains a stretch with progress and cancellation from the host.
fn train(
    call: &Call<'_>,
    model: &Model,
    trainer: &mut Trainer,
    data: &DeviceData,
    pre: &Preprocess,
    stretch: Stretch<'_>,
) -> Result<Vec<Value>> {
    let Stretch {
        epochs,
        phase,
        extra,
        class_weights,
    } = stretch;
    run_epochs(call, phase, epochs, |_, hooks| {
        let stats = match (extra, class_weights) {
            (None, None) => trainer.epoch(model, data, pre, hooks).map_err(nn_err)?,
            (None, Some(w)) => {
                let loss =
                    |logits: &Tensor, y: &Tensor| audit_nn::train::cross_entropy(logits, y) * w.index_select(0, y);
                trainer.epoch_with(model, data, pre, &loss, hooks).map_err(nn_err)?
            }
            (Some((suspects, weight, kind)), _) => {
                // Every clean batch also takes a batch of the extra samples.
                let n = suspects.len().max(1);
                let counter = std::cell::Cell::new(0i64);
                let mode = if trainer.cfg.freeze_bn {
                    audit_nn::Mode::TrainFrozenBn
                } else {
                    audit_nn::Mode::Train
                };
                let loss = |logits: &Tensor, y: &Tensor| -> Tensor {
                    let clean = audit_nn::train::cross_entropy(logits, y);
                    let k = (y.size()[0]).min(n);
                    let start = (counter.get() * k) % n;
                    counter.set(counter.get() + 1);
                    let take = k.min(n - start);
                    let xs = pre.apply(&suspects.x.narrow(0, start, take));
                    let ys = suspects.y.narrow(0, start, take);
                    match model.forward(&xs, mode) {
                        Ok(l) => match kind {
                            ExtraLoss::Ascend => {
                                let ascend = audit_nn::train::cross_entropy(&l, &ys).mean(Kind::Float).clamp_max(5.0);
                                clean - ascend * weight
                            }
                            ExtraLoss::AwayFromLabel => {
                                let p = l.softmax(-1, Kind::Float).gather(1, &ys.unsqueeze(1), false);
                                let away = (-p + 1.0).clamp_min(1e-6).log().mean(Kind::Float);
                                clean - away * weight
                            }
                        },
                        Err(_) => clean,
                    }
                };
                trainer.epoch_with(model, data, pre, &loss, hooks).map_err(nn_err)?
            }
        };
        Ok((stats, EpochNotes::fields(json!({ "phase": phase }))))
    })
}

/// What the class-wise split found in one round.
struct ClassSplit {
    /// [N] bool: the suspects of the accepted classes.
    mask: Tensor,
    /// The accepted (target) classes.
    targets: Vec<i64>,
    /// Per class: the verdict and what the trigger detector added.
    report: Vec<Value>,
    /// Per class: the first leave-class-out probe's labels for its members.
    probes: Vec<ClassProbe>,
    /// The all-to-all detector's finds, when mapped sides were accepted (else null).
    all_to_all: Value,
}

/// Judges every class's side with a leave-class-out probe (a fresh copy of the graph trained on
/// `class_probe_samples` images of the other classes, which then names each member's best other
/// class); for an accepted class, trains a trigger detector (a fresh copy separating the side from
/// other classes' images and the class's core, cross-entropy weighted to balance the two) and
/// takes every member it scores at least `trigger_threshold`, with the side.
#[allow(clippy::too_many_arguments)]
fn class_split(
    call: &Call<'_>,
    model_bytes: &[u8],
    full: &DeviceData,
    pre: &Preprocess,
    sides: &[ClassSide],
    paper: Option<(&Tensor, &Tensor)>,
    k: i64,
    p: &Params,
    seed: u64,
    adam: &dyn Fn(usize) -> TrainConfig,
    report_epochs: &mut Vec<Value>,
) -> Result<ClassSplit> {
    let host = call.host;
    let device = full.x.device();
    let n = full.len();
    let (probe, _) = load_model(model_bytes, device, false)?;
    tch::manual_seed(seed as i64);
    let order = Tensor::randperm(n, (Kind::Int64, device));
    let mut mask = Tensor::zeros([n], (Kind::Bool, device));
    let (mut targets, mut report, mut probes) = (Vec::new(), Vec::new(), Vec::new());
    // Trains the probe graph afresh (initialised from `init`) on `set` and returns its logits for
    // `members`.
    let mut fit = |init: u64, set: &DeviceData, stretch: Stretch<'_>, members: &DeviceData| -> Result<Tensor> {
        probe.reinitialize(init);
        let mut t = Trainer::new(&probe, adam(stretch.epochs)).map_err(nn_err)?;
        report_epochs.extend(train(call, &probe, &mut t, set, pre, stretch)?);
        audit_nn::train::predict(&probe, members, pre, 512).map_err(nn_err)
    };
    // Sides accepted class by class, then (all-to-all) the mapped ones; each with the index of its
    // class's report entry and probe.
    let mut accepted: Vec<Pending> = Vec::new();
    let mut mapped: Vec<Pending> = Vec::new();
    for split_side in sides {
        host.check_cancelled()?;
        let class = split_side.class;
        let others = order.masked_select(&full.y.index_select(0, &order).ne(class));
        let take = others.narrow(0, 0, p.class_probe_samples.min(others.size()[0]));
        let members = full.select(&split_side.members);
        let phase = format!("probe without class {class}");
        let logits = fit(
            seed.wrapping_add(class as u64),
            &full.select(&take),
            Stretch::plain(p.class_probe_epochs, &phase),
            &members,
        )?;
        let judge = p.judge();
        let class_probe = ClassProbe::new(class, &split_side.members, &logits);
        // Candidate sides: the split's, then (paper_filter=novel) the paper's suspects of the class.
        let from_paper = paper.and_then(|(mask, h)| paper_side(mask, h, &class_probe, k, p.class_rare));
        probes.push(class_probe);
        let mut second: Option<Tensor> = None;
        let mut second_probe = |second: &mut Option<Tensor>| -> Result<()> {
            if second.is_none() {
                // A second probe, on the next images of the order, with another initialisation.
                let end = (2 * p.class_probe_samples).min(others.size()[0]);
                let start = (end - p.class_probe_samples).max(0);
                let take2 = others.narrow(0, start, end - start);
                let phase = format!("second probe without class {class}");
                *second = Some(fit(
                    seed.wrapping_add(0x2d00 + class as u64),
                    &full.select(&take2),
                    Stretch::plain(p.class_probe_epochs, &phase),
                    &members,
                )?);
            }
            Ok(())
        };
        let mut verdicts: Vec<(&'static str, SideVerdict)> = Vec::new();
        let mut chosen: Option<(&'static str, ClassSide, SideVerdict)> = None;
        let candidates = [("split", Some(split_side)), ("paper", from_paper.as_ref())];
        for (origin, s) in candidates {
            let Some(s) = s else { continue };
            let mut v = judge_side(s, &logits, k, judge);
            if v.candidate {
                second_probe(&mut second)?;
                confirm_side(&mut v, s, &logits, second.as_ref().expect("trained above"), judge);
            }
            verdicts.push((origin, v.clone()));
            if v.accepted {
                chosen = Some((origin, s.shallow_clone(), v));
                break;
            }
        }
        // The class's entry is the split side's verdict; the paper side's, when judged, beside it.
        let mut entry = verdict_entry(&verdicts[0].1);
        if let Some((_, v)) = verdicts.iter().find(|(o, _)| *o == "paper") {
            entry["paper_side"] = verdict_entry(v);
        }
        let index = report.len();
        if let Some((origin, side, verdict)) = chosen {
            accepted.push(Pending {
                origin,
                side,
                verdict,
                index,
                source: None,
            });
        } else if p.class_mapped_min > 0 {
            // All-to-all: a side the probe sends, concentrated, to one novel class (its source).
            for (origin, s) in candidates {
                let Some(s) = s else { continue };
                let Some((_, v)) = verdicts.iter().find(|(o, _)| *o == origin) else {
                    continue;
                };
                let Some(source) = mapped_source(v, judge) else {
                    continue;
                };
                second_probe(&mut second)?;
                let mut v = v.clone();
                v.candidate = true;
                confirm_side(&mut v, s, &logits, second.as_ref().expect("trained above"), judge);
                let judged = json!({
                    "side": origin, "source": source, "n": v.flagged, "agreement": v.agreement,
                    "agreement_low": v.agreement_low, "confirmed": v.accepted,
                });
                match entry.get_mut("mapped").and_then(Value::as_array_mut) {
                    Some(list) => list.push(judged),
                    None => entry["mapped"] = json!([judged]),
                }
                if v.accepted {
                    mapped.push(Pending {
                        origin: "mapped",
                        side: s.shallow_clone(),
                        verdict: v,
                        index,
                        source: Some(source),
                    });
                    break;
                }
            }
        }
        report.push(entry);
    }
    // The mapped sides are accepted together, when at least class_mapped_min of them come from
    // distinct source classes (an all-to-all poisoning maps many classes; a clean class with a
    // sub-population resembling one novel class is a single case).
    let mut sources: Vec<i64> = mapped.iter().filter_map(|m| m.source).collect();
    sources.sort_unstable();
    sources.dedup();
    let mut mapped_ok = p.class_mapped_min > 0 && sources.len() >= p.class_mapped_min;
    let mut cross_check = Value::Null;
    if mapped_ok && mapped.len() >= 2 && p.trigger_epochs > 0 {
        let indices: Vec<usize> = mapped.iter().map(|m| m.index).collect();
        let (kept, checked) = cross_check_mapped(&mut fit, full, mapped, &order, k, p, seed)?;
        for (&i, c) in indices.iter().zip(&checked) {
            report[i]["mapped_cross_check"] = c.clone();
        }
        host.info(&format!(
            "all-to-all cross-check: {} of {} mapped sides are flagged, mostly, by a detector trained on the other sides",
            kept.len(),
            checked.len()
        ));
        mapped = kept;
        sources = mapped.iter().filter_map(|m| m.source).collect();
        sources.sort_unstable();
        sources.dedup();
        mapped_ok = sources.len() >= p.class_mapped_min;
        cross_check = json!(checked);
    }
    if !mapped.is_empty() {
        host.info(&format!(
            "{} class(es) have a confirmed side mapped from one other class ({} distinct sources; {} needed): {}",
            mapped.len(),
            sources.len(),
            p.class_mapped_min,
            if mapped_ok {
                "accepted as an all-to-all poisoning"
            } else {
                "not accepted"
            }
        ));
    }
    // Detector groups: one per all-to-one class, one for all the mapped sides (they share the trigger).
    let mut groups: Vec<Vec<Pending>> = accepted.into_iter().map(|a| vec![a]).collect();
    if mapped_ok {
        groups.push(mapped);
    }
    let mut all_to_all = Value::Null;
    for group in groups {
        host.check_cancelled()?;
        let hits = if p.trigger_epochs > 0 {
            let classes: Vec<i64> = group.iter().map(|g| g.side.class).collect();
            let negatives = other_classes(&full.y, &order, &classes, p.trigger_negatives, None);
            let members: Vec<&Pending> = group.iter().collect();
            let found = detect_trigger(&mut fit, full, &members, &negatives, k, p, seed)?;
            for g in &group {
                report[g.index]["trigger_core_held_out"] = json!(found.held_n);
                report[g.index]["trigger_core_held_out_flagged"] = json!(found.held_flagged);
            }
            if let Some(all) = &found.all {
                // The classes outside the group: their members the detector flags join the suspects.
                let per_class = Vec::<i64>::try_from(
                    full.y
                        .masked_select(all)
                        .bincount::<Tensor>(None, k)
                        .to_device(Device::Cpu),
                )
                .unwrap_or_default();
                host.info(&format!(
                    "all-to-all trigger detector: {} training samples flagged, per class {per_class:?}",
                    all.sum(Kind::Int64).int64_value(&[])
                ));
                all_to_all = json!({
                    "classes": group.iter().map(|g| g.side.class).collect::<Vec<_>>(),
                    "sources": group.iter().map(|g| g.source).collect::<Vec<_>>(),
                    "flagged_per_class": per_class,
                    "held_out_core_flagged": found.held_flagged,
                    "cross_check": cross_check.take(),
                });
                let _ = mask.logical_or_(all);
            }
            found.hits
        } else {
            group.iter().map(|g| g.side.in_side.copy()).collect()
        };
        for (g, hit) in group.iter().zip(hits) {
            let (s, v) = (&g.side, &g.verdict);
            let probe_of_class = &probes[g.index];
            let added = hit.logical_and(&s.in_side.logical_not());
            let (labels_added, added_share, added_spread) = probe_novelty(probe_of_class, &added, &v.novel_classes, k);
            let flagged = s.members.masked_select(&hit);
            let nf = flagged.size()[0];
            let _ = mask.index_fill_(0, &flagged, 1);
            host.info(&format!(
                "class {}: {} of {} samples are suspects ({} on the {} side; the probe without the class sends {:.0}% of the side to classes the rest does not go to, spread {:.2}{})",
                v.class,
                nf,
                v.n,
                v.flagged,
                match g.origin { "split" => "split's", "paper" => "paper's split", _ => "mapped" },
                v.novel_share * 100.0,
                v.novel_spread,
                g.source.map(|c| format!(", mostly to class {c}")).unwrap_or_default()
            ));
            let entry = &mut report[g.index];
            entry["accepted"] = json!(true);
            entry["accepted_side"] = json!(g.origin);
            if let Some(c) = g.source {
                entry["source"] = json!(c);
            }
            entry["probe_labels_added"] = json!(labels_added);
            entry["added_novel_share"] = json!(added_share);
            entry["added_novel_spread"] = json!(added_spread);
            entry["flagged"] = json!(nf);
            entry["trigger_detector_added"] = json!(nf - v.flagged);
            targets.push(s.class);
        }
    }
    targets.sort_unstable();
    Ok(ClassSplit {
        mask,
        targets,
        report,
        probes,
        all_to_all,
    })
}

/// What the clean-label check found.
struct CleanLabelFound {
    /// [N] bool: the training samples it drops (None: nothing flagged, or skipped).
    mask: Option<Tensor>,
    /// The classes it flagged.
    classes: Vec<i64>,
    report: Value,
}

/// The clean-label check (`clean_label=scan`): SCAn's statistics on the training set's
/// penultimate features `features` ([N, D], labels `labels`) with the clean subset as the trusted
/// set. A clean-label poisoning (SIG) adds triggered images of the target class to it: the
/// leave-class-out probe sends them where the class goes, so the class-wise split cannot accept
/// them, but in the variation's whitened space they are a second identity of their class, which
/// SCAn's two-identity statistic measures against the other classes. The suspicious subgroups of
/// the flagged classes are dropped, and SCAn runs again on what is left (`clean_label_passes`)
/// while a class flagged before stays flagged: when every training image of a class carries the
/// trigger, the first split separates the images least like the clean ones, and the rest still
/// forms a second identity beside the clean images.
#[allow(clippy::too_many_arguments)]
fn clean_label_check(
    call: &Call<'_>,
    model: &Model,
    pre: &Preprocess,
    features: &Tensor,
    labels: &Tensor,
    clean: Option<&DeviceData>,
    k: i64,
    p: &Params,
    seed: u64,
) -> Result<CleanLabelFound> {
    let host = call.host;
    let skipped = |why: String| {
        host.info(&format!("clean-label check skipped: {why}"));
        Ok(CleanLabelFound {
            mask: None,
            classes: vec![],
            report: json!({"method": "scan", "skipped": why}),
        })
    };
    let Some(clean) = clean else {
        return skipped("no clean subset was lent (it is SCAn's trusted set)".into());
    };
    let classes = to_i64s(&clean.y.bincount::<Tensor>(None, k).gt(0).sum(Kind::Int64))?[0];
    if clean.len() < 2 || classes < 2 {
        return skipped(format!(
            "the clean subset has {} image(s) of {classes} class(es); SCAn needs 2 classes",
            clean.len()
        ));
    }
    let started = std::time::Instant::now();
    let fc = penultimate_features(call, model, clean, pre, 512, "clean-label check: clean features")?;
    let cfg = ScanConfig {
        threshold: p.clean_label_threshold,
        ..ScanConfig::default()
    };
    let device = labels.device();
    let n = labels.size()[0];
    let mut mask = Tensor::zeros([n], (Kind::Bool, device));
    let mut left = Tensor::arange(n, (Kind::Int64, device));
    let mut flagged: Vec<i64> = Vec::new();
    let mut passes = Vec::new();
    for pass in 0..p.clean_label_passes {
        let y = labels.index_select(0, &left);
        let found = scan::analyse(
            call,
            &features.index_select(0, &left),
            &y,
            &fc,
            &clean.y,
            k,
            &cfg,
            seed.wrapping_add(pass as u64),
        )?;
        let summary = found.summary(&cfg);
        host.info(&format!("clean-label check (SCAn), pass {}: {summary}", pass + 1));
        // After the first pass only the classes flagged before are judged again.
        let targets: Vec<i64> = if pass == 0 {
            found.targets.clone()
        } else {
            found.targets.iter().copied().filter(|c| flagged.contains(c)).collect()
        };
        let picked: Vec<i64> = if targets.is_empty() {
            vec![]
        } else {
            let at = Tensor::from_slice(&found.suspicious).to_device(device);
            let of = Tensor::from_slice(&targets).to_device(device);
            let keep = Tensor::isin(&y.index_select(0, &at), &of, false, false);
            to_i64s(&left.index_select(0, &at.masked_select(&keep)))?
        };
        let mut entry = found.details();
        entry["pass"] = json!(pass + 1);
        entry["targets"] = json!(targets);
        entry["dropped"] = json!(picked.len());
        entry["summary"] = json!(summary);
        passes.push(entry);
        if picked.is_empty() {
            break;
        }
        let at = Tensor::from_slice(&picked).to_device(device);
        let _ = mask.index_fill_(0, &at, 1);
        left = mask.logical_not().nonzero().flatten(0, -1);
        if pass == 0 {
            flagged = targets;
        }
    }
    let dropped = to_i64s(&mask.sum(Kind::Int64))?[0];
    let mut per_class = serde_json::Map::new();
    if !flagged.is_empty() {
        let per = to_i64s(&labels.masked_select(&mask).bincount::<Tensor>(None, k))?;
        let totals = to_i64s(&labels.bincount::<Tensor>(None, k))?;
        let of_class: Vec<String> = flagged
            .iter()
            .map(|&c| {
                per_class.insert(c.to_string(), json!(per[c as usize]));
                format!("{} of {} in class {c}", per[c as usize], totals[c as usize])
            })
            .collect();
        host.info(&format!(
            "clean-label check: {dropped} training samples dropped ({})",
            of_class.join(", ")
        ));
    }
    let report = json!({
        "method": "scan",
        "threshold": cfg.threshold,
        "classes": flagged,
        "dropped": dropped,
        "dropped_per_class": per_class,
        "clean_samples": clean.len(),
        "passes": passes,
        "seconds": started.elapsed().as_secs_f64(),
    });
    Ok(CleanLabelFound {
        mask: (dropped > 0).then_some(mask),
        classes: flagged,
        report,
    })
}

/// An accepted side waiting for its trigger detector.
struct Pending {
    /// split, paper or mapped.
    origin: &'static str,
    side: ClassSide,
    verdict: SideVerdict,
    /// Its class's report entry and probe.
    index: usize,
    /// Mapped: the class the probe sends most of the side to.
    source: Option<i64>,
}

/// A side's verdict as its report entry.
fn verdict_entry(v: &SideVerdict) -> Value {
    json!({
        "class": v.class, "n": v.n, "side": v.flagged, "separation": v.separation,
        "novel_share": v.novel_share, "novel_share_low": v.novel_share_low, "novel_spread": v.novel_spread,
        "confidence_side": v.confidence_side, "confidence_rest": v.confidence_rest,
        "candidate": v.candidate, "agreement": v.agreement, "agreement_low": v.agreement_low, "accepted": v.accepted,
        "novel_classes": v.novel_classes, "probe_labels_side": v.labels_side, "probe_labels_rest": v.labels_rest,
    })
}

/// What a trigger detector found.
struct Detected {
    /// Per side: its class's members on the side or scored at least `trigger_threshold`. [n] bool
    hits: Vec<Tensor>,
    /// The held-out core's size and the share of it flagged.
    held_n: i64,
    held_flagged: f64,
    /// A mapped group: every training sample scored at least `trigger_threshold`. [N] bool
    all: Option<Tensor>,
}

/// The all-to-all cross-check, leave one out. The mapped sides of an all-to-all poisoning carry
/// one trigger, so a detector trained on the other mapped sides flags most of each side; a clean
/// sub-population that resembles another class (shirts that look like T-shirts, coats like
/// dresses) is its own look-alike, and a detector learnt on other classes' look-alikes or on the
/// trigger has no reason to carry over. For each side, a detector is trained as
/// [`detect_trigger`] trains one on every other mapped side, its negatives leaving that side out
/// (it would teach the detector that the trigger is negative). A side is kept when its detector
/// scores at least `trigger_threshold` on at least half of it (a majority, not a tuned value).
/// One detector per mapped side: the price of the check. (Halves, one detector per half of the
/// sides, were tried first: on the PyTorch all-to-all model a half holding one clean look-alike
/// beside a true side did not carry over to two true sides of the other half.) Returns the kept
/// sides and, per mapped side, its class, source, flagged share and whether it was kept.
fn cross_check_mapped(
    fit: &mut dyn FnMut(u64, &DeviceData, Stretch<'_>, &DeviceData) -> Result<Tensor>,
    full: &DeviceData,
    mapped: Vec<Pending>,
    order: &Tensor,
    k: i64,
    p: &Params,
    seed: u64,
) -> Result<(Vec<Pending>, Vec<Value>)> {
    let n = full.len();
    let device = full.x.device();
    let on_side = |i: usize| mapped[i].side.members.masked_select(&mapped[i].side.in_side);
    let mut share = vec![0.0f64; mapped.len()];
    for (i, out) in share.iter_mut().enumerate() {
        let mut excluded = Tensor::zeros([n], (Kind::Bool, device));
        let _ = excluded.index_fill_(0, &on_side(i), 1);
        let group: Vec<&Pending> = (0..mapped.len()).filter(|&j| j != i).map(|j| &mapped[j]).collect();
        let classes: Vec<i64> = group.iter().map(|g| g.side.class).collect();
        let negatives = other_classes(&full.y, order, &classes, p.trigger_negatives, Some(&excluded));
        let found = detect_trigger(
            fit,
            full,
            &group,
            &negatives,
            k,
            p,
            seed.wrapping_add(0xc4ec + i as u64),
        )?;
        let all = found.all.expect("a mapped group scores every sample");
        *out = all
            .index_select(0, &on_side(i))
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
    }
    let checked: Vec<Value> = mapped
        .iter()
        .zip(&share)
        .map(|(m, &s)| json!({"class": m.side.class, "source": m.source, "flagged_by_the_others": s, "kept": s >= 0.5}))
        .collect();
    let kept = mapped
        .into_iter()
        .zip(share)
        .filter(|(_, s)| *s >= 0.5)
        .map(|(m, _)| m)
        .collect();
    Ok((kept, checked))
}

/// Trains one trigger detector for a group of accepted sides (one all-to-one class, or every
/// mapped side of an all-to-all poisoning, which share the trigger) and scores every member of
/// their classes. Three labelled groups (the core labelled 2 when the graph has three outputs,
/// else it joins the other classes), each weighing the same share of the loss: the sides (1),
/// `other` (images of classes outside the group, [`other_classes`]: 0), and each class's core
/// half (2). Returns per side its members' hits ([n] bool: on the side, or scored at least
/// `trigger_threshold`), the held-out core's size and share flagged, and (a mapped group) every
/// training sample's hit.
fn detect_trigger(
    fit: &mut dyn FnMut(u64, &DeviceData, Stretch<'_>, &DeviceData) -> Result<Tensor>,
    full: &DeviceData,
    group: &[&Pending],
    other: &Tensor,
    k: i64,
    p: &Params,
    seed: u64,
) -> Result<Detected> {
    let device = full.x.device();
    let score_all = group.iter().any(|g| g.origin == "mapped");
    let classes: Vec<i64> = group.iter().map(|g| g.side.class).collect();
    let sets: Vec<_> = group.iter().map(|g| trigger_sets(&g.side)).collect();
    let side = Tensor::cat(&sets.iter().map(|t| t.side.shallow_clone()).collect::<Vec<_>>(), 0);
    let core = Tensor::cat(&sets.iter().map(|t| t.core.shallow_clone()).collect::<Vec<_>>(), 0);
    let labels = if k >= 3 { 3 } else { 2 };
    let core_label = if labels == 3 { 2 } else { 0 };
    let parts = [(other, 0i64), (&side, 1), (&core, core_label)];
    let index = Tensor::cat(&parts.map(|(t, _)| t.shallow_clone()), 0);
    let y = Tensor::cat(
        &parts.map(|(t, l)| Tensor::full([t.size()[0]], l, (Kind::Int64, device))),
        0,
    );
    let set = DeviceData {
        x: full.x.index_select(0, &index),
        y,
    };
    let total = index.size()[0] as f64;
    let mut counts = vec![0i64; labels as usize];
    for (t, l) in parts {
        counts[l as usize] += t.size()[0];
    }
    let present = counts.iter().filter(|&&c| c > 0).count().max(1) as f64;
    let mut w = vec![0.0f32; k.max(2) as usize];
    for (g, &c) in counts.iter().enumerate() {
        w[g] = (total / (present * c.max(1) as f64)) as f32;
    }
    let w = Tensor::from_slice(&w).to_device(device);
    let phase = if group.len() == 1 {
        format!("trigger detector for class {}", classes[0])
    } else {
        format!("trigger detector for classes {classes:?}")
    };
    let stretch = Stretch {
        epochs: p.trigger_epochs,
        phase: &phase,
        extra: None,
        class_weights: Some(&w),
    };
    let init = if group.len() == 1 {
        seed.wrapping_add(0x7419_0000 + classes[0] as u64)
    } else {
        seed.wrapping_add(0x7419_1000)
    };
    // A mapped group scores every training sample: each class of an all-to-all poisoning is a
    // target, also those whose side the split did not isolate.
    let members = if score_all {
        Tensor::arange(full.len(), (Kind::Int64, device))
    } else {
        Tensor::cat(
            &group.iter().map(|g| g.side.members.shallow_clone()).collect::<Vec<_>>(),
            0,
        )
    };
    let l = fit(init, &set, stretch, &full.select(&members))?;
    let p1 = l.narrow(1, 0, labels).softmax(-1, Kind::Float).select(1, 1);
    let all = score_all.then(|| p1.ge(p.trigger_threshold));
    let (mut hits, mut held_hit, mut held_n, mut start) = (Vec::new(), 0i64, 0i64, 0i64);
    for (g, t) in group.iter().zip(&sets) {
        let n = g.side.members.size()[0];
        let score = if score_all {
            p1.index_select(0, &g.side.members)
        } else {
            p1.narrow(0, start, n)
        };
        start += n;
        let held = score.index_select(0, &t.held_out);
        held_n += held.size()[0];
        held_hit += held.ge(p.trigger_threshold).sum(Kind::Int64).int64_value(&[]);
        hits.push(g.side.in_side.logical_or(&score.ge(p.trigger_threshold)));
    }
    let held_flagged = if held_n > 0 {
        held_hit as f64 / held_n as f64
    } else {
        0.0
    };
    Ok(Detected {
        hits,
        held_n,
        held_flagged,
        all,
    })
}

impl Defense for NoneDefense {
    fn defend(
        &self,
        call: &Call<'_>,
        model_bytes: &[u8],
        train_set: Option<&DatasetRef<'_>>,
        clean: Option<&DatasetRef<'_>>,
    ) -> Result<Hardened> {
        let p: Params = call.params.parse::<Params>()?.effective();
        if p.lamda_l >= p.lamda_h {
            return Err(Error::invalid(format!(
                "lamda_l ({}) must be below lamda_h ({})",
                p.lamda_l, p.lamda_h
            )));
        }
        let train_set = train_set.ok_or_else(|| Error::invalid("NONE needs the training set"))?;
        let device = device(call)?;
        let seed = call.seed.wrapping_add(p.seed);
        let (model, pre) = load_model(model_bytes, device, false)?;
        let full = device_data(train_set, device)?;
        let n = full.len();
        let host = call.host;
        // The clean-label check's trusted set: the clean subset the host lends.
        let clean_data = match clean {
            Some(c) if p.clean_label == CleanLabel::Scan && p.suspects != Suspects::Paper && !c.is_empty() => {
                Some(device_data(c, device)?)
            }
            _ => None,
        };
        let base = |lr: f64, freeze_bn: bool, epochs: usize| TrainConfig {
            epochs,
            batch_size: p.batch_size,
            lr,
            weight_decay: 5e-4,
            optimizer: Optimizer::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
            schedule: Schedule::Constant,
            freeze_bn,
            augment: Augment::crop_flip(p.augment),
            seed,
            group_lr: vec![],
        };
        // A fresh copy's training: Adam at retrain_lr, cosine (repair=retrain and the probe).
        let adam = |epochs: usize| {
            let mut cfg = base(p.retrain_lr, false, epochs);
            cfg.schedule = Schedule::Cosine { min_lr: 0.0 };
            cfg.optimizer = Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
            };
            cfg.weight_decay = 0.0;
            cfg
        };
        let mut report_epochs = Vec::new();
        // E1: normal training from scratch (the paper's schedule, lr x0.1 every 80 epochs).
        let mut trainer = if p.e1 > 0 {
            model.reinitialize(seed);
            let mut cfg = base(p.e1_lr, false, p.e1);
            cfg.schedule = Schedule::Step { every: 80, gamma: 0.1 };
            let mut t = Trainer::new(&model, cfg).map_err(nn_err)?;
            report_epochs.extend(train(call, &model, &mut t, &full, &pre, Stretch::plain(p.e1, "E1"))?);
            t.cfg.schedule = Schedule::Constant;
            t
        } else {
            Trainer::new(&model, base(p.none_lr, true, p.e2)).map_err(nn_err)?
        };

        let mut layers: Vec<_> = model.layers().into_iter().filter(|l| !l.is_output).collect();
        layers.retain(|l| match p.layers {
            Layers::Conv => l.op_type == "Conv",
            Layers::Dense => l.op_type != "Conv",
            Layers::All => true,
        });
        if layers.is_empty() {
            return Err(Error::invalid(
                "the model has no monitored layer (Conv or hidden Gemm/MatMul with weights)",
            ));
        }
        // The class-wise split reads the penultimate features: the input of the logits layer.
        let features = model
            .layers()
            .into_iter()
            .rev()
            .find(|l| l.is_output)
            .and_then(|l| l.input);
        let sample = full.x.narrow(0, 0, 1);
        let shapes = model.value_shapes(&pre.apply(&sample)).map_err(nn_err)?;
        let mut all_suspects: Vec<i64> = Vec::new();
        let mut rounds = Vec::new();
        for round in 0..p.r {
            host.check_cancelled()?;
            let phase = format!("analysis {}/{}", round + 1, p.r);
            let want_features = if p.suspects == Suspects::Paper { None } else { features };
            let acts = model
                .collect_activations_and_features(&full, &pre, &layers, want_features, 512, &mut |d, t| {
                    host.progress(&phase, d, t)
                })
                .map_err(nn_err)?;
            let sel = select_neurons(
                &acts.probs,
                &acts.channel_max,
                p.lamda_h,
                p.lamda_l,
                p.max_reset_fraction,
            );
            let break_value = jenks_break(&sel.h);
            let paper_mask = sel.h.ge(break_value);
            let mut class_report = Value::Null;
            let mut all_to_all = Value::Null;
            let mut paper_groups: Vec<Value> = Vec::new();
            let mut accepted_sides: Option<Tensor> = None;
            let mut clean_label = Value::Null;
            let mut retrain_cycles: Vec<Value> = Vec::new();
            let mut clean_label_classes: Vec<i64> = Vec::new();
            let suspect_mask = match (&acts.features, p.suspects) {
                (_, Suspects::Paper) => paper_mask,
                (None, _) => {
                    host.info("no penultimate features (no logits layer found): class-wise split skipped");
                    paper_mask
                }
                (Some(f), mode) => {
                    let k = acts.probs.size()[1];
                    let sides = class_sides(f, &full.y, k);
                    let split = class_split(
                        call,
                        model_bytes,
                        &full,
                        &pre,
                        &sides,
                        (p.paper_filter == PaperFilter::Novel).then_some((&paper_mask, &sel.h)),
                        k,
                        &p,
                        seed.wrapping_add(0x5eed_0000 + 1000 * round as u64),
                        &adam,
                        &mut report_epochs,
                    )?;
                    let (mut class_mask, targets) = (split.mask, split.targets);
                    class_report = Value::Array(split.report);
                    all_to_all = split.all_to_all;
                    accepted_sides = Some(class_mask.shallow_clone());
                    if p.clean_label == CleanLabel::Scan {
                        let seed = seed.wrapping_add(0xc1ea_0000 + round as u64);
                        let checked =
                            clean_label_check(call, &model, &pre, f, &full.y, clean_data.as_ref(), k, &p, seed)?;
                        if let Some(found) = &checked.mask {
                            class_mask = class_mask.logical_or(found);
                            // Its suspects are pushed off their label in the retraining as well.
                            accepted_sides = Some(class_mask.shallow_clone());
                        }
                        clean_label = checked.report;
                        clean_label_classes = checked.classes;
                    }
                    if mode == Suspects::Class {
                        class_mask
                    } else {
                        let refined = paper_suspects_kept(&paper_mask, &full.y, k, &targets, p.paper_with_targets);
                        let (refined, groups) = match p.paper_filter {
                            PaperFilter::Novel => paper_groups_judged(&refined, &split.probes, k, p.judge()),
                            PaperFilter::None => (refined, Vec::new()),
                        };
                        let returned: Vec<String> = groups
                            .iter()
                            .filter(|g| g.kept < g.suspects)
                            .map(|g| format!("{} of class {}", g.suspects - g.kept, g.class))
                            .collect();
                        paper_groups = groups
                            .iter()
                            .map(|g| {
                                json!({"class": g.class, "suspects": g.suspects, "n": g.n, "swept": g.swept,
                                       "novel_share": g.novel_share, "novel_spread": g.novel_spread, "kept": g.kept})
                            })
                            .collect();
                        host.info(&format!(
                            "paper's split: {} suspects, {} of them dropped{}{}",
                            paper_mask.sum(Kind::Int64).int64_value(&[]),
                            refined.sum(Kind::Int64).int64_value(&[]),
                            if targets.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    " (a target was detected; paper_with_targets={:?})",
                                    p.paper_with_targets
                                )
                            },
                            if returned.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    "; back in the training, as their class's probe sends them where the class goes: {}",
                                    returned.join(", ")
                                )
                            }
                        ));
                        refined.logical_or(&class_mask)
                    }
                }
            };
            let suspects: Vec<i64> =
                Vec::<i64>::try_from(suspect_mask.nonzero().flatten(0, -1).to_device(Device::Cpu)).unwrap_or_default();
            if p.cumulative_suspects {
                all_suspects.extend(&suspects);
                all_suspects.sort_unstable();
                all_suspects.dedup();
            } else {
                all_suspects = suspects.clone();
            }
            host.info(&format!(
                "round {}: {} suspects of {n} (Jenks break {break_value:.4})",
                round + 1,
                suspects.len()
            ));

            // Reset the selected neurons.
            let mut layer_report = Vec::new();
            for (li, l) in layers.iter().enumerate() {
                let chosen = &sel.neurons[li];
                model.reset_neurons(l, chosen, &shapes).map_err(nn_err)?;
                layer_report.push(json!({
                    "layer": l.node, "op_type": l.op_type, "neurons": l.channels,
                    "reset": chosen, "scores": sel.scores[li],
                }));
            }

            // The data minus suspects.
            let mut keep = Tensor::ones([n], (Kind::Bool, device));
            if !all_suspects.is_empty() {
                let _ = keep.index_fill_(0, &Tensor::from_slice(&all_suspects).to_device(device), 0);
            }
            let kept_at = keep.nonzero().flatten(0, -1);
            let kept = full.select(&kept_at);
            let mut rest = DeviceData {
                x: kept.x.shallow_clone(),
                y: kept.y.shallow_clone(),
            };
            if let (Some(c), true) = (&clean_data, p.clean_label_add_clean && !clean_label_classes.is_empty()) {
                let of = Tensor::from_slice(&clean_label_classes).to_device(device);
                let added = c.select(&Tensor::isin(&c.y, &of, false, false).nonzero().flatten(0, -1));
                host.info(&format!(
                    "the clean subset's {} image(s) of class(es) {clean_label_classes:?} join the repair's training set",
                    added.len()
                ));
                rest = DeviceData {
                    x: Tensor::cat(&[&rest.x, &added.x.to_kind(rest.x.kind())], 0),
                    y: Tensor::cat(&[&rest.y, &added.y], 0),
                };
            }
            let repaired = match p.repair {
                Repair::Retrain => {
                    // The bar: how well the analysed model fits the samples the retrain keeps.
                    let bar = acts
                        .probs
                        .index_select(0, &kept_at)
                        .argmax(-1, false)
                        .eq_tensor(&kept.y)
                        .to_kind(Kind::Double)
                        .mean(Kind::Double)
                        .double_value(&[]);
                    model.reinitialize(seed.wrapping_add(round as u64 + 1));
                    // The accepted class-wise sides and the clean-label check's suspects (high
                    // precision) teach the fresh model that their trigger does not mean their
                    // label, so the poisoned samples they missed cannot re-teach it.
                    let pushed = accepted_sides
                        .as_ref()
                        .filter(|_| p.retrain_push_away > 0.0)
                        .map(|m| full.select(&m.nonzero().flatten(0, -1)));
                    let extra = pushed
                        .as_ref()
                        .filter(|d| !d.is_empty())
                        .map(|d| (d, p.retrain_push_away, ExtraLoss::AwayFromLabel));
                    let mut log = Vec::new();
                    for cycle in 0..p.retrain_cycles {
                        let mut cfg = adam(p.e2);
                        if p.retrain_optimizer == RetrainOptimizer::Sgd {
                            cfg = base(p.retrain_lr, false, p.e2);
                            cfg.schedule = Schedule::Cosine { min_lr: 0.0 };
                        }
                        trainer = Trainer::new(&model, cfg).map_err(nn_err)?;
                        let phase = if cycle == 0 {
                            "retrain".to_string()
                        } else {
                            format!("retrain cycle {}", cycle + 1)
                        };
                        let stretch = Stretch::with_extra(p.e2, &phase, extra);
                        log.extend(train(call, &model, &mut trainer, &rest, &pre, stretch)?);
                        let fit = audit_nn::train::accuracy(&model, &kept, &pre, 512).map_err(nn_err)?;
                        let again = fit < bar && cycle + 1 < p.retrain_cycles;
                        host.info(&format!(
                            "retrain cycle {}: the retrained model fits {fit:.4} of the {} kept training samples, the analysed model {bar:.4}{}",
                            cycle + 1,
                            kept.len(),
                            if again { ": another cycle" } else { "" }
                        ));
                        retrain_cycles.push(json!({"cycle": cycle + 1, "epochs": p.e2, "fit": fit, "bar": bar}));
                        if fit >= bar {
                            break;
                        }
                    }
                    log
                }
                Repair::Unlearn => {
                    trainer.cfg.freeze_bn = true;
                    trainer.set_lr(p.none_lr.max(1e-3)).map_err(nn_err)?;
                    let sus = full.select(&Tensor::from_slice(&all_suspects).to_device(device));
                    let extra = (!all_suspects.is_empty()).then_some((&sus, p.unlearn_weight, ExtraLoss::Ascend));
                    train(
                        call,
                        &model,
                        &mut trainer,
                        &rest,
                        &pre,
                        Stretch::with_extra(p.e2, "unlearn", extra),
                    )?
                }
                Repair::Finetune => {
                    trainer.cfg.freeze_bn = true;
                    trainer.set_lr(p.none_lr).map_err(nn_err)?;
                    train(
                        call,
                        &model,
                        &mut trainer,
                        &rest,
                        &pre,
                        Stretch::plain(p.e2, "fine-tune"),
                    )?
                }
            };
            report_epochs.extend(repaired);
            rounds.push(json!({
                "round": round + 1,
                "layers": layer_report,
                "n_suspects": suspects.len(),
                "jenks_break": break_value,
                "class_split": class_report,
                "all_to_all": all_to_all,
                "paper_groups": paper_groups,
                "clean_label": clean_label,
                "suspects": suspects,
                "n_excluded": all_suspects.len(),
                "repair": p.repair,
                "retrain_cycles": retrain_cycles,
            }));
        }
        let out = export_hardened(&model, "none", call)?;
        Ok(Hardened {
            model: out,
            dropped: all_suspects,
            report: json!({
                "defense": "none",
                "preset": p.preset,
                "suspects": p.suspects,
                "repair": p.repair,
                "device": format!("{device:?}").to_lowercase(),
                "n_train": n,
                "monitored_layers": layers.len(),
                "rounds": rounds,
                "epochs": report_epochs,
            }),
        })
    }
}

audit_sdk::export_plugin!(defense: NoneDefense);

#[cfg(test)]
mod tests;
