//! The training loop every plugin reuses: data kept on the device, seeded shuffling, batched
//! augmentation on the device, libtorch's own SGD/Adam (per-group learning rates), step and
//! cosine schedules, BatchNormalization in train or frozen mode, progress and cancellation hooks.

use tch::{no_grad, COptimizer, Device, Kind, Tensor};

use crate::error::{NnError, Result};
use crate::model::{Model, ParamRole};
use crate::ops::Mode;

/// Pixel preprocessing: the model sees `(pixel/255 - mean) / std` per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Default for Preprocess {
    fn default() -> Self {
        Preprocess {
            mean: vec![0.0],
            std: vec![1.0],
        }
    }
}

/// Model metadata key of the preprocessing mean (comma-separated: one value or one per channel).
pub const MEAN_KEY: &str = "audit.mean";
/// Model metadata key of the preprocessing std (comma-separated; every value > 0).
pub const STD_KEY: &str = "audit.std";

/// A comma-separated list of finite numbers (`key` names it in errors).
fn parse_list(key: &str, s: &str) -> Result<Vec<f64>> {
    let v: Option<Vec<f64>> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>().ok().filter(|x| x.is_finite()))
        .collect();
    v.filter(|v| !v.is_empty())
        .ok_or_else(|| NnError::Parse(format!("{key}=`{s}`: not a comma-separated list of finite numbers")))
}

impl Preprocess {
    /// From the two comma-separated lists (absent: mean 0, std 1), validated: finite numbers,
    /// every std > 0. The one parser of `audit.mean`/`audit.std` for the host and the plugins.
    pub fn parse(mean: Option<&str>, std: Option<&str>) -> Result<Preprocess> {
        let pre = Preprocess {
            mean: mean.map_or(Ok(vec![0.0]), |s| parse_list(MEAN_KEY, s))?,
            std: std.map_or(Ok(vec![1.0]), |s| parse_list(STD_KEY, s))?,
        };
        if let Some(bad) = pre.std.iter().find(|&&s| s <= 0.0) {
            return Err(NnError::Parse(format!(
                "{STD_KEY}=`{}`: every std must be > 0 (got {bad})",
                std.unwrap_or_default()
            )));
        }
        Ok(pre)
    }

    /// From the model's `audit.mean`/`audit.std` metadata (which `audit harden` writes).
    pub fn from_metadata(model: &Model) -> Result<Preprocess> {
        Preprocess::parse(model.metadata(MEAN_KEY), model.metadata(STD_KEY))
    }

    /// Raw images (u8 0..255 or float 0..1) to the float range 0..1.
    pub fn to_unit(x: &Tensor) -> Tensor {
        if x.kind() == Kind::Uint8 {
            x.to_kind(Kind::Float) / 255.0
        } else {
            x.to_kind(Kind::Float)
        }
    }

    /// Normalises images already in 0..1.
    pub fn normalize(&self, x01: &Tensor) -> Tensor {
        let c = x01.size()[1];
        let per = |v: &[f64]| -> Tensor {
            let vals: Vec<f32> = (0..c as usize)
                .map(|i| *v.get(i).or(v.first()).unwrap_or(&0.0) as f32)
                .collect();
            Tensor::from_slice(&vals).to_device(x01.device()).view([1, c, 1, 1])
        };
        if self.mean.iter().all(|&m| m == 0.0) && self.std.iter().all(|&s| s == 1.0) {
            return x01.shallow_clone();
        }
        (x01 - per(&self.mean)) / per(&self.std)
    }

    /// Raw images to model input.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        self.normalize(&Self::to_unit(x))
    }
}

/// A labelled set held on the device: images (u8 or f32, NCHW) and i64 labels.
#[derive(Debug)]
pub struct DeviceData {
    pub x: Tensor,
    pub y: Tensor,
}

impl DeviceData {
    /// Moves images and labels to `device`.
    pub fn new(x: &Tensor, y: &Tensor, device: Device) -> DeviceData {
        DeviceData {
            x: x.to_device(device),
            y: y.to_kind(Kind::Int64).to_device(device),
        }
    }
    /// From host pixels (u8 0..255, NCHW) and labels.
    pub fn from_u8(pixels: &[u8], shape: [i64; 4], labels: &[i64], device: Device) -> DeviceData {
        let x = Tensor::from_slice(pixels).view(shape);
        DeviceData::new(&x, &Tensor::from_slice(labels), device)
    }

    /// From host pixels (f32 0..1, NCHW) and labels.
    pub fn from_f32(pixels: &[f32], shape: [i64; 4], labels: &[i64], device: Device) -> DeviceData {
        let x = Tensor::from_slice(pixels).view(shape);
        DeviceData::new(&x, &Tensor::from_slice(labels), device)
    }

    /// Number of samples.
    pub fn len(&self) -> i64 {
        self.y.size()[0]
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The samples at `idx` (an i64 tensor).
    pub fn select(&self, idx: &Tensor) -> DeviceData {
        let idx = idx.to_device(self.x.device());
        DeviceData {
            x: self.x.index_select(0, &idx),
            y: self.y.index_select(0, &idx),
        }
    }
}

/// Optimiser.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    Sgd { momentum: f64, nesterov: bool },
    Adam { beta1: f64, beta2: f64 },
}

impl Optimizer {
    /// SGD with `momentum`, not Nesterov (the fine-tunings' and the host's training).
    pub fn sgd(momentum: f64) -> Optimizer {
        Optimizer::Sgd {
            momentum,
            nesterov: false,
        }
    }

    /// Adam with PyTorch's default betas (0.9, 0.999).
    pub fn adam() -> Optimizer {
        Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
        }
    }
}

/// Learning-rate schedule over epochs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Constant,
    /// Multiply by `gamma` every `every` epochs.
    Step {
        every: usize,
        gamma: f64,
    },
    /// Cosine annealing from the base rate to `min_lr` over the run.
    Cosine {
        min_lr: f64,
    },
}

/// Batched augmentation done on the device.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Augment {
    /// Random crop after zero padding by this many pixels (0: off).
    pub crop_padding: i64,
    /// Random horizontal flip.
    pub flip: bool,
}

impl Augment {
    /// CIFAR-style augmentation (random crop with padding 4 and horizontal flip) when `on`, else
    /// none.
    pub fn crop_flip(on: bool) -> Augment {
        if on {
            Augment {
                crop_padding: 4,
                flip: true,
            }
        } else {
            Augment::default()
        }
    }
}

/// How to train.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: i64,
    pub lr: f64,
    pub weight_decay: f64,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    /// Freeze BatchNormalization (running statistics fixed; affine parameters still train).
    pub freeze_bn: bool,
    pub augment: Augment,
    pub seed: u64,
    /// Learning-rate multipliers per parameter-name prefix (first match wins); others use 1.
    pub group_lr: Vec<(String, f64)>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            batch_size: 128,
            lr: 0.01,
            weight_decay: 5e-4,
            optimizer: Optimizer::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
            schedule: Schedule::Constant,
            freeze_bn: false,
            augment: Augment::default(),
            seed: 0,
            group_lr: vec![],
        }
    }
}

/// A progress callback: (phase, done, total).
pub type ProgressFn<'a> = Box<dyn FnMut(&str, u64, u64) + 'a>;

/// Callbacks for progress and cancellation.
pub struct Hooks<'a> {
    /// (phase, done, total).
    pub progress: ProgressFn<'a>,
    /// True once the user asked to stop.
    pub cancelled: Box<dyn Fn() -> bool + 'a>,
}

impl std::fmt::Debug for Hooks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}

impl Hooks<'_> {
    /// No progress, never cancelled.
    pub fn none() -> Hooks<'static> {
        Hooks {
            progress: Box::new(|_, _, _| {}),
            cancelled: Box::new(|| false),
        }
    }
}

/// What one epoch did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochStats {
    pub loss: f64,
    pub accuracy: f64,
    pub samples: i64,
    pub seconds: f64,
}

/// A loss over logits and labels: returns per-sample losses of shape [B].
pub type LossFn<'a> = &'a dyn Fn(&Tensor, &Tensor) -> Tensor;

/// A step of [`Trainer::epoch_custom`]: (normalised batch, labels, mode) to (per-sample losses
/// `[B]`, logits `[B, K]`).
type StepFn<'a> = dyn FnMut(&Tensor, &Tensor, Mode) -> Result<(Tensor, Tensor)> + 'a;

/// Labels must index the logits' classes: a label >= the model's output count (or negative)
/// is an error naming both, not a libtorch panic in the loss.
pub fn check_labels(logits: &Tensor, y: &Tensor) -> Result<()> {
    if y.numel() == 0 || logits.dim() != 2 {
        return Ok(());
    }
    check_label_range(label_range(y), logits.size()[1])
}

/// The smallest and largest label of `y` (one read from the device).
pub fn label_range(y: &Tensor) -> (i64, i64) {
    if y.numel() == 0 {
        return (0, 0);
    }
    let ends = Tensor::stack(&[y.min(), y.max()], 0).to_device(tch::Device::Cpu);
    (ends.int64_value(&[0]), ends.int64_value(&[1]))
}

/// [`check_labels`] for labels whose range is known (see [`label_range`]) against `classes`
/// outputs: no device read, so a training loop can check every batch for free.
pub fn check_label_range((lo, hi): (i64, i64), classes: i64) -> Result<()> {
    if lo < 0 || hi >= classes {
        return Err(crate::error::NnError::tensor(
            "labels",
            format!(
                "label {} is outside the model's {classes} output classes (0..{classes})",
                if lo < 0 { lo } else { hi }
            ),
        ));
    }
    Ok(())
}

/// Per-sample cross-entropy.
pub fn cross_entropy(logits: &Tensor, y: &Tensor) -> Tensor {
    logits
        .log_softmax(-1, Kind::Float)
        .nll_loss_nd::<Tensor>(y, None, tch::Reduction::None, -100)
}

/// Random crop (with zero padding) and flip, per sample, vectorised on the device.
pub fn augment(x01: &Tensor, a: Augment) -> Tensor {
    let mut x = x01.shallow_clone();
    let dev = x.device();
    let (b, _c, h, w) = x.size4().expect("NCHW");
    if a.crop_padding > 0 {
        let p = a.crop_padding;
        let padded = x.constant_pad_nd([p, p, p, p]).permute([0, 2, 3, 1]); // B, H+2p, W+2p, C
        let dy = Tensor::randint(2 * p + 1, [b], (Kind::Int64, dev));
        let dx = Tensor::randint(2 * p + 1, [b], (Kind::Int64, dev));
        let rows = dy.unsqueeze(1) + Tensor::arange(h, (Kind::Int64, dev)).unsqueeze(0); // B, H
        let cols = dx.unsqueeze(1) + Tensor::arange(w, (Kind::Int64, dev)).unsqueeze(0); // B, W
        let bi = Tensor::arange(b, (Kind::Int64, dev)).view([b, 1, 1]);
        x = padded
            .index(&[Some(bi), Some(rows.unsqueeze(2)), Some(cols.unsqueeze(1))])
            .permute([0, 3, 1, 2])
            .contiguous();
    }
    if a.flip {
        let mask = Tensor::rand([b], (Kind::Float, dev)).lt(0.5).view([b, 1, 1, 1]);
        x = x.flip([3]).where_self(&mask, &x);
    }
    x
}

/// Trains a model; keeps the optimiser state across calls (so a defense can change the learning
/// rate and keep momentum, as NONE does).
pub struct Trainer {
    opt: COptimizer,
    pub cfg: TrainConfig,
    groups: Vec<f64>,
    base_lr: f64,
    epochs_done: usize,
    masks: Vec<(usize, Tensor)>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("cfg", &self.cfg)
            .field("epochs_done", &self.epochs_done)
            .finish()
    }
}

impl Trainer {
    /// An optimiser over the model's trainable parameters (create it after moving the model to
    /// its device: it holds the parameter tensors).
    pub fn new(model: &Model, cfg: TrainConfig) -> Result<Trainer> {
        let mut opt = match cfg.optimizer {
            Optimizer::Sgd { momentum, nesterov } => {
                COptimizer::sgd(cfg.lr, momentum, 0.0, cfg.weight_decay, nesterov)?
            }
            Optimizer::Adam { beta1, beta2 } => COptimizer::adam(cfg.lr, beta1, beta2, cfg.weight_decay, 1e-8, false)?,
        };
        let mut groups: Vec<f64> = vec![1.0];
        for p in model.params.iter().filter(|p| p.role == ParamRole::Trainable) {
            let mult = cfg
                .group_lr
                .iter()
                .find(|(prefix, _)| p.name.starts_with(prefix.as_str()))
                .map_or(1.0, |g| g.1);
            let g = match groups.iter().position(|&m| m == mult) {
                Some(g) => g,
                None => {
                    groups.push(mult);
                    groups.len() - 1
                }
            };
            opt.add_parameters(&p.tensor, g)?;
        }
        let base_lr = cfg.lr;
        let mut t = Trainer {
            opt,
            cfg,
            groups,
            base_lr,
            epochs_done: 0,
            masks: vec![],
        };
        t.apply_lr(base_lr)?;
        Ok(t)
    }

    fn apply_lr(&mut self, lr: f64) -> Result<()> {
        for (g, mult) in self.groups.clone().into_iter().enumerate() {
            self.opt.set_learning_rate_group(g, lr * mult)?;
        }
        Ok(())
    }

    /// Sets the base learning rate (schedules scale from it); the optimiser state is kept.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.base_lr = lr;
        self.apply_lr(lr)
    }

    /// Keeps parameter `param` (index into `model.params`) multiplied by `mask` after every step.
    pub fn add_mask(&mut self, param: usize, mask: Tensor) {
        self.masks.push((param, mask));
    }

    fn lr_for(&self, epoch: usize) -> f64 {
        let e = epoch as f64;
        match self.cfg.schedule {
            Schedule::Constant => self.base_lr,
            Schedule::Step { every, gamma } => self.base_lr * gamma.powi((epoch / every.max(1)) as i32),
            Schedule::Cosine { min_lr } => {
                let t = self.cfg.epochs.max(1) as f64;
                min_lr + 0.5 * (self.base_lr - min_lr) * (1.0 + (std::f64::consts::PI * e / t).cos())
            }
        }
    }

    /// One epoch over `data` with `loss` (per-sample losses; their mean is minimised).
    pub fn epoch_with(
        &mut self,
        model: &Model,
        data: &DeviceData,
        pre: &Preprocess,
        loss: LossFn<'_>,
        hooks: &mut Hooks<'_>,
    ) -> Result<EpochStats> {
        // The labels' range is read from the device once per epoch, not once per batch: each
        // batch's logits are checked against it by shape alone, before the loss indexes them.
        let range = label_range(&data.y);
        self.epoch_custom(
            model,
            data,
            pre,
            &mut |xb: &Tensor, yb: &Tensor, mode: Mode| {
                let logits = model.forward(xb, mode)?;
                if logits.dim() == 2 {
                    check_label_range(range, logits.size()[1])?;
                }
                Ok((loss(&logits, yb), logits))
            },
            hooks,
        )
    }

    /// One epoch over `data` where `step` runs the model itself (taps, a second model, a loss
    /// over intermediate values). Batching, shuffling, augmentation, the learning-rate schedule,
    /// masks, progress and cancellation are those of [`Trainer::epoch_with`], which calls this.
    ///
    /// `step(x, y, mode)` gets the batch as the model sees it (augmented and normalised), its
    /// labels and the mode to run the trained model in (`Train`, or `TrainFrozenBn` with
    /// `freeze_bn`), and returns the per-sample losses `[B]` (their mean is minimised and reported
    /// in [`EpochStats::loss`]) and the logits `[B, K]` (for the training accuracy). A loss that is
    /// not a sum over samples can be returned as `loss.expand([b], false)`.
    pub fn epoch_custom(
        &mut self,
        model: &Model,
        data: &DeviceData,
        pre: &Preprocess,
        step: &mut StepFn<'_>,
        hooks: &mut Hooks<'_>,
    ) -> Result<EpochStats> {
        let started = std::time::Instant::now();
        let lr = self.lr_for(self.epochs_done);
        self.apply_lr(lr)?;
        let mode = if self.cfg.freeze_bn {
            Mode::TrainFrozenBn
        } else {
            Mode::Train
        };
        let n = data.len();
        if n == 0 {
            return Err(NnError::Other("cannot train on an empty dataset".into()));
        }
        tch::manual_seed(self.cfg.seed.wrapping_add(self.epochs_done as u64 * 7919) as i64);
        let perm = Tensor::randperm(n, (Kind::Int64, data.x.device()));
        let bs = self.cfg.batch_size.max(1);
        let steps = (n + bs - 1) / bs;
        let (mut loss_sum, mut correct) = (
            Tensor::zeros([], (Kind::Double, data.x.device())),
            Tensor::zeros([], (Kind::Int64, data.x.device())),
        );
        for s in 0..steps {
            if (hooks.cancelled)() {
                return Err(NnError::Cancelled);
            }
            let idx = perm.narrow(0, s * bs, (n - s * bs).min(bs));
            let xb = Preprocess::to_unit(&data.x.index_select(0, &idx));
            let xb = if self.cfg.augment != Augment::default() {
                augment(&xb, self.cfg.augment)
            } else {
                xb
            };
            let xb = pre.normalize(&xb);
            let yb = data.y.index_select(0, &idx);
            let (l, logits) = step(&xb, &yb, mode)?;
            let mean = l.mean(Kind::Float);
            self.opt.zero_grad()?;
            mean.backward();
            self.opt.step()?;
            self.apply_masks(model);
            no_grad(|| {
                loss_sum += l.detach().sum(Kind::Double);
                correct += logits.argmax(-1, false).eq_tensor(&yb).sum(Kind::Int64);
            });
            (hooks.progress)("train", (s + 1) as u64, steps as u64);
        }
        self.epochs_done += 1;
        Ok(EpochStats {
            loss: loss_sum.double_value(&[]) / n as f64,
            accuracy: correct.int64_value(&[]) as f64 / n as f64,
            samples: n,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// One epoch of cross-entropy training.
    pub fn epoch(
        &mut self,
        model: &Model,
        data: &DeviceData,
        pre: &Preprocess,
        hooks: &mut Hooks<'_>,
    ) -> Result<EpochStats> {
        self.epoch_with(model, data, pre, &cross_entropy, hooks)
    }

    fn apply_masks(&self, model: &Model) {
        if self.masks.is_empty() {
            return;
        }
        no_grad(|| {
            for (i, m) in &self.masks {
                let _ = model.params[*i].tensor.shallow_clone().f_mul_(m);
            }
        });
    }
}

/// Logits for every sample (eval mode, batched).
pub fn predict(model: &Model, data: &DeviceData, pre: &Preprocess, batch: i64) -> Result<Tensor> {
    let n = data.len();
    let mut outs = Vec::new();
    no_grad(|| -> Result<()> {
        let mut s = 0;
        while s < n {
            let k = (n - s).min(batch);
            outs.push(model.forward(&pre.apply(&data.x.narrow(0, s, k)), Mode::Eval)?);
            s += k;
        }
        Ok(())
    })?;
    Ok(Tensor::cat(&outs, 0))
}

/// Accuracy in eval mode.
pub fn accuracy(model: &Model, data: &DeviceData, pre: &Preprocess, batch: i64) -> Result<f64> {
    let logits = predict(model, data, pre, batch)?;
    Ok(logits
        .argmax(-1, false)
        .eq_tensor(&data.y)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_3_labels_beyond_the_logits_are_an_error_not_a_panic() {
        let logits = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu));
        assert!(check_labels(&logits, &Tensor::from_slice(&[0i64, 1, 2, 2])).is_ok());
        let e = check_labels(&logits, &Tensor::from_slice(&[0i64, 7, 2, 2])).unwrap_err();
        assert!(
            matches!(e, NnError::Tensor { .. }) && e.to_string().contains("label 7 is outside the model's 3"),
            "{e}"
        );
        assert!(check_labels(&logits, &Tensor::from_slice(&[-1i64, 0, 0, 0])).is_err());
    }
    use crate::zoo::{self, Arch};

    fn small_cnn(seed: u64) -> Model {
        let proto = zoo::build(Arch::SmallCnn, [1, 8, 8], 3, seed).expect("zoo model");
        Model::load(&zoo::to_bytes(&proto), None).expect("model loads")
    }

    fn data() -> DeviceData {
        let pixels: Vec<u8> = (0..24 * 64).map(|i| ((i * 37 + i / 64 * 11) % 256) as u8).collect();
        let labels: Vec<i64> = (0..24).map(|i| i % 3).collect();
        DeviceData::from_u8(&pixels, [24, 1, 8, 8], &labels, Device::Cpu)
    }

    fn config(freeze_bn: bool) -> TrainConfig {
        TrainConfig {
            batch_size: 10,
            lr: 0.05,
            freeze_bn,
            seed: 3,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn epoch_custom_with_cross_entropy_is_epoch_with() {
        let pre = Preprocess {
            mean: vec![0.5],
            std: vec![0.5],
        };
        let data = data();
        let (a, b) = (small_cnn(1), small_cnn(1));
        let mut ta = Trainer::new(&a, config(false)).unwrap();
        let mut tb = Trainer::new(&b, config(false)).unwrap();
        for _ in 0..2 {
            let sa = ta
                .epoch_with(&a, &data, &pre, &cross_entropy, &mut Hooks::none())
                .unwrap();
            let mut batches = Vec::new();
            let sb = tb
                .epoch_custom(
                    &b,
                    &data,
                    &pre,
                    &mut |x: &Tensor, y: &Tensor, mode: Mode| {
                        assert_eq!(mode, Mode::Train);
                        // Normalised: (pixel/255 - 0.5)/0.5 lies in [-1, 1] and reaches below 0.
                        assert!(x.min().double_value(&[]) >= -1.0 && x.min().double_value(&[]) < 0.0);
                        batches.push(y.size()[0]);
                        let logits = b.forward(x, mode)?;
                        Ok((cross_entropy(&logits, y), logits))
                    },
                    &mut Hooks::none(),
                )
                .unwrap();
            assert_eq!(batches, vec![10, 10, 4]);
            assert_eq!((sa.loss, sa.accuracy, sa.samples), (sb.loss, sb.accuracy, sb.samples));
        }
        // The same steps: bit-identical weights.
        for (x, y) in a.trainable().iter().zip(b.trainable()) {
            assert!(x.equal(y));
        }
    }

    #[test]
    fn an_epoch_refuses_labels_beyond_the_logits_before_any_step() {
        let model = small_cnn(1);
        let before: Vec<Tensor> = model.trainable().iter().map(|t| t.detach().copy()).collect();
        let mut data = data();
        data.y = data.y.where_scalarother(&data.y.ne(2), 5);
        assert_eq!(label_range(&data.y), (0, 5));
        let mut t = Trainer::new(&model, config(false)).unwrap();
        let e = t
            .epoch(&model, &data, &Preprocess::default(), &mut Hooks::none())
            .unwrap_err();
        assert!(e.to_string().contains("label 5 is outside the model's 3"), "{e}");
        // Refused at the first batch, before an optimiser step.
        for (a, b) in before.iter().zip(model.trainable()) {
            assert!(a.equal(b));
        }
    }

    #[test]
    fn epoch_custom_trains_a_loss_on_taps() {
        let pre = Preprocess::default();
        let data = data();
        let model = small_cnn(2);
        let conv1 = model.layers()[0].value;
        let mut t = Trainer::new(&model, config(true)).unwrap();
        let mut losses = Vec::new();
        for _ in 0..4 {
            let s = t
                .epoch_custom(
                    &model,
                    &data,
                    &pre,
                    &mut |x: &Tensor, _y: &Tensor, mode: Mode| {
                        assert_eq!(mode, Mode::TrainFrozenBn);
                        let (mut outs, taps) = model.forward_with_taps(&[x], mode, &[conv1])?;
                        // Per sample: the mean square of conv1's output.
                        let l = taps[0].square().mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float);
                        Ok((l, outs.swap_remove(0)))
                    },
                    &mut Hooks::none(),
                )
                .unwrap();
            losses.push(s.loss);
        }
        assert!(losses.iter().all(|l| l.is_finite()));
        assert!(
            losses.windows(2).all(|w| w[1] < w[0]) && losses[3] < 0.75 * losses[0],
            "the tap's loss is minimised: {losses:?}"
        );
        // An error from the step stops the epoch.
        let e = t
            .epoch_custom(
                &model,
                &data,
                &pre,
                &mut |_: &Tensor, _: &Tensor, _: Mode| Err(NnError::Other("boom".into())),
                &mut Hooks::none(),
            )
            .unwrap_err();
        assert!(e.to_string().contains("boom"));
    }
}

#[cfg(test)]
mod preprocess_tests {
    use super::Preprocess;

    #[test]
    fn preprocessing_lists_are_parsed_once_and_validated() {
        assert_eq!(Preprocess::parse(None, None).unwrap(), Preprocess::default());
        let p = Preprocess::parse(Some("0.5, 0.25"), Some("0.5,2")).unwrap();
        assert_eq!((p.mean, p.std), (vec![0.5, 0.25], vec![0.5, 2.0]));
        for (mean, std, want) in [
            (Some("a"), None, "audit.mean=`a`"),
            (None, Some("0"), "every std must be > 0"),
            (None, Some("1,-2"), "every std must be > 0"),
            (None, Some("nan"), "finite numbers"),
            (Some(""), None, "finite numbers"),
        ] {
            let e = Preprocess::parse(mean, std).unwrap_err().to_string();
            assert!(e.contains(want), "{mean:?} {std:?}: {e}");
        }
    }
}
