//! Blend patterns: seeded uniform noise, a checkerboard, or a binary PGM/PPM image file.

use std::path::Path;

use audit_attack_common::{stream, Dims, Rng};

/// A pattern in 0..1, laid out C*H*W like one image: uniform noise from `seed` (independent of the
/// call seed, so poisoning and triggering stamp the same pattern).
pub fn noise(seed: u64, dims: Dims) -> Vec<f32> {
    let mut rng = Rng::stream(seed, stream::PATTERN);
    (0..dims.len()).map(|_| rng.next_f64() as f32).collect()
}

/// A one-pixel checkerboard: 1 where `row + col` is even, else 0, the same in every channel.
pub fn checker(dims: Dims) -> Vec<f32> {
    (0..dims.len())
        .map(|i| {
            if (i / dims.w + i % dims.w).is_multiple_of(2) {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// A decoded binary PNM image: samples in 0..1, laid out H*W*channels.
#[derive(Debug, Clone, PartialEq)]
pub struct Pnm {
    /// 1 (PGM, P5) or 3 (PPM, P6).
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// Samples divided by the file's maxval, row-major, channels interleaved.
    pub samples: Vec<f32>,
}

/// Parses a binary PGM (`P5`) or PPM (`P6`) image; `maxval` up to 65535 (two bytes, big-endian,
/// above 255). Header comments (`#` to end of line) are skipped.
pub fn parse_pnm(bytes: &[u8]) -> Result<Pnm, String> {
    let channels = match bytes.get(..2) {
        Some(b"P5") => 1,
        Some(b"P6") => 3,
        _ => return Err("not a binary PGM (P5) or PPM (P6) file".into()),
    };
    let mut pos = 2;
    let mut header = [0usize; 3];
    for (slot, name) in header.iter_mut().zip(["width", "height", "maxval"]) {
        loop {
            match bytes.get(pos) {
                Some(b) if b.is_ascii_whitespace() => pos += 1,
                Some(b'#') => {
                    while bytes.get(pos).is_some_and(|&b| b != b'\n') {
                        pos += 1;
                    }
                }
                _ => break,
            }
        }
        let start = pos;
        while bytes.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        let text = std::str::from_utf8(&bytes[start..pos]).unwrap_or_default();
        *slot = text.parse().map_err(|_| format!("bad {name} in the header"))?;
    }
    let [width, height, maxval] = header;
    if width == 0 || height == 0 {
        return Err(format!("empty image ({width}x{height})"));
    }
    if !(1..=65535).contains(&maxval) {
        return Err(format!("maxval {maxval} is outside 1..=65535"));
    }
    if !bytes.get(pos).is_some_and(u8::is_ascii_whitespace) {
        return Err("no whitespace after maxval".into());
    }
    let raster = &bytes[pos + 1..];
    let per_sample = if maxval > 255 { 2 } else { 1 };
    let count = width * height * channels;
    if raster.len() < count * per_sample {
        return Err(format!(
            "truncated: {width}x{height} with {channels} channel(s) needs {} bytes of pixels, found {}",
            count * per_sample,
            raster.len()
        ));
    }
    let scale = 1.0 / maxval as f32;
    let samples = if per_sample == 1 {
        raster[..count]
            .iter()
            .map(|&b| (f32::from(b) * scale).min(1.0))
            .collect()
    } else {
        raster[..2 * count]
            .chunks_exact(2)
            .map(|b| (f32::from(u16::from_be_bytes([b[0], b[1]])) * scale).min(1.0))
            .collect()
    };
    Ok(Pnm {
        channels,
        height,
        width,
        samples,
    })
}

/// Turns a decoded image into a C*H*W pattern: nearest-neighbour resize to the images' H, W (source
/// row `floor(y * height / H)`); a grey image is replicated over every channel, an RGB image is used
/// as is for 3-channel images and converted to luma (0.299 R + 0.587 G + 0.114 B) for 1-channel
/// images.
pub fn fit(img: &Pnm, dims: Dims) -> Result<Vec<f32>, String> {
    if img.channels == 3 && dims.c != 3 && dims.c != 1 {
        return Err(format!("an RGB pattern cannot be used for {}-channel images", dims.c));
    }
    let mut out = vec![0.0; dims.len()];
    for y in 0..dims.h {
        let sy = y * img.height / dims.h;
        for x in 0..dims.w {
            let sx = x * img.width / dims.w;
            let src = &img.samples[(sy * img.width + sx) * img.channels..][..img.channels];
            for c in 0..dims.c {
                out[(c * dims.h + y) * dims.w + x] = match (img.channels, dims.c) {
                    (1, _) => src[0],
                    (_, 1) => 0.299 * src[0] + 0.587 * src[1] + 0.114 * src[2],
                    _ => src[c],
                };
            }
        }
    }
    Ok(out)
}

/// Reads `path` as PGM/PPM and fits it to `dims`; errors name the file.
pub fn from_file(path: &str, dims: Dims) -> Result<Vec<f32>, String> {
    let bytes = std::fs::read(Path::new(path)).map_err(|e| format!("pattern_file `{path}`: {e}"))?;
    let img = parse_pnm(&bytes).map_err(|e| format!("pattern_file `{path}`: {e}"))?;
    fit(&img, dims).map_err(|e| format!("pattern_file `{path}`: {e}"))
}
