//! A seeded synthetic dataset: 10 classes of 1x28x28 images, each class a distinct bar pattern
//! plus noise, so a small CNN can learn it. Used where no real data is installed.

use super::{Dataset, Images, LabeledSet, Pixels};

fn split(seed: u64, n: usize) -> LabeledSet {
    let (h, w) = (28usize, 28usize);
    let mut state = seed ^ 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut pixels = vec![0u8; n * h * w];
    let mut labels = Vec::with_capacity(n);
    for (i, img) in pixels.chunks_exact_mut(h * w).enumerate() {
        let label = (i % 10) as i64;
        labels.push(label);
        let k = label as usize;
        for (p, px) in img.iter_mut().enumerate() {
            let (y, x) = (p / w, p % w);
            // Class k: a bar whose orientation and position depend on k.
            let on = if k < 5 { (x / 3) % 5 == k } else { (y / 3) % 5 == k - 5 };
            let noise = (next() % 64) as u8;
            *px = if on { 160 + noise } else { noise };
        }
    }
    LabeledSet {
        images: Images {
            n,
            c: 1,
            h,
            w,
            pixels: Pixels::U8(pixels),
        },
        labels,
    }
}

/// `n_train` and `n_test` samples, deterministic for `seed`.
pub fn synthetic(seed: u64, n_train: usize, n_test: usize) -> Dataset {
    Dataset {
        source: "synthetic".into(),
        train: split(seed, n_train),
        test: split(seed.wrapping_add(1), n_test),
        num_classes: 10,
        poison_idx: None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_deterministic_and_balanced() {
        let a = super::synthetic(7, 100, 20);
        let b = super::synthetic(7, 100, 20);
        assert_eq!(a.train, b.train);
        assert_ne!(a.train, super::synthetic(8, 100, 20).train);
        assert_eq!(a.train.labels.iter().filter(|&&l| l == 3).count(), 10);
    }
}
