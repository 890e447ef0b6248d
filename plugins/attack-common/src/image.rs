//! Pixels of either dtype, patch positions, and stamping a trigger onto chosen images.

use audit_sdk::serde_json::{Map, Value};
use audit_sdk::{Call, DatasetRef, Error, Result, Tensor, TensorData};
use serde::Deserialize;

/// An image element: u8 in 0..=255 or f32 in 0..=1. Triggers compute in `f32` in the element's own
/// unit (`MAX` is full intensity) and write back with [`Pixel::from_f32`], which clamps (and rounds
/// for u8).
pub trait Pixel: Copy {
    /// Full intensity in this element's unit: 255 for u8, 1 for f32.
    const MAX: f32;
    /// The value as `f32`, in this element's unit.
    fn to_f32(self) -> f32;
    /// Back from `f32`: clamped to `0..=MAX`, rounded to nearest for u8.
    fn from_f32(v: f32) -> Self;
    /// Converts a value in pixel units (0..255) into this element's unit.
    fn from_pixel_units(v: f32) -> f32 {
        v / 255.0 * Self::MAX
    }
}

impl Pixel for u8 {
    const MAX: f32 = 255.0;
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
    fn from_f32(v: f32) -> Self {
        v.round().clamp(0.0, 255.0) as u8
    }
    fn from_pixel_units(v: f32) -> f32 {
        v
    }
}

impl Pixel for f32 {
    const MAX: f32 = 1.0;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v.clamp(0.0, 1.0)
    }
}

/// Channels, height and width of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

impl Dims {
    /// The dims of a dataset's images.
    pub fn of(data: &DatasetRef<'_>) -> Dims {
        let (c, h, w) = data.chw();
        Dims { c, h, w }
    }
    /// Elements per image.
    pub fn len(&self) -> usize {
        self.c * self.h * self.w
    }
    /// True when an image has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a square patch sits in the image (the schema's `position`: `bottom-right`,
/// `bottom-left`, `top-right`, `top-left`, `center`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Position {
    /// Bottom-right corner (the BadNets default).
    BottomRight,
    /// Bottom-left corner.
    BottomLeft,
    /// Top-right corner.
    TopRight,
    /// Top-left corner.
    TopLeft,
    /// Centre, rounded towards the top-left.
    Center,
}

impl Position {
    /// The schema spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Position::BottomRight => "bottom-right",
            Position::BottomLeft => "bottom-left",
            Position::TopRight => "top-right",
            Position::TopLeft => "top-left",
            Position::Center => "center",
        }
    }

    /// Top-left corner `(row, col)` of a `size`x`size` patch in an `h`x`w` image; `size` must fit.
    /// The centre is rounded towards the top-left.
    pub fn origin(self, size: usize, h: usize, w: usize) -> (usize, usize) {
        let (bottom, right) = (h - size, w - size);
        match self {
            Position::BottomRight => (bottom, right),
            Position::BottomLeft => (bottom, 0),
            Position::TopRight => (0, right),
            Position::TopLeft => (0, 0),
            Position::Center => (bottom / 2, right / 2),
        }
    }
}

/// A trigger that modifies one image in place.
pub trait Stamp {
    /// Stamps the trigger on `image` (one C*H*W image, in `P`'s unit); `sample` is its index in the
    /// dataset (for triggers that differ per sample).
    fn apply<P: Pixel>(&self, sample: usize, image: &mut [P]);
    /// The trigger's effective parameters, for reports.
    fn report(&self) -> Map<String, Value>;
}

fn stamp_slice<P: Pixel, S: Stamp>(
    call: &Call<'_>,
    pixels: &mut [P],
    per_image: usize,
    indices: &[usize],
    phase: &str,
    stamp: &S,
) -> Result<()> {
    let total = indices.len();
    let step = (total / 10).max(1);
    call.host.progress(phase, 0, total as u64);
    for (done, &i) in indices.iter().enumerate() {
        if done % step == 0 {
            call.host.check_cancelled()?;
            if done > 0 {
                call.host.progress(phase, done as u64, total as u64);
            }
        }
        let image = pixels
            .get_mut(i * per_image..(i + 1) * per_image)
            .ok_or_else(|| Error::failed(format!("plugin bug: sample {i} is out of range")))?;
        stamp.apply(i, image);
    }
    call.host.progress(phase, total as u64, total as u64);
    Ok(())
}

/// Applies `stamp` to the images `indices` of `images` (NCHW, u8 or f32), reporting progress as
/// `phase` and stopping with `Cancelled` when the user asks.
pub fn stamp_in_place<S: Stamp>(
    call: &Call<'_>,
    images: &mut Tensor,
    indices: &[usize],
    phase: &str,
    stamp: &S,
) -> Result<()> {
    let n = images.shape.first().copied().unwrap_or(0).max(0) as usize;
    if n == 0 {
        return Ok(());
    }
    let per_image = images.numel() / n;
    match &mut images.data {
        TensorData::U8(v) => stamp_slice(call, v, per_image, indices, phase, stamp),
        TensorData::F32(v) => stamp_slice(call, v, per_image, indices, phase, stamp),
        TensorData::I64(_) => Err(Error::invalid("images must be u8 or f32")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_conversions_clamp_and_round() {
        assert_eq!(u8::from_f32(254.6), 255);
        assert_eq!(u8::from_f32(300.0), 255);
        assert_eq!(u8::from_f32(-3.0), 0);
        assert_eq!(f32::from_f32(1.5), 1.0);
        assert_eq!(<f32 as Pixel>::from_pixel_units(255.0), 1.0);
        assert_eq!(<u8 as Pixel>::from_pixel_units(17.0), 17.0);
    }

    #[test]
    fn positions_place_the_patch_inside() {
        assert_eq!(Position::BottomRight.origin(3, 32, 30), (29, 27));
        assert_eq!(Position::BottomLeft.origin(3, 32, 30), (29, 0));
        assert_eq!(Position::TopRight.origin(3, 32, 30), (0, 27));
        assert_eq!(Position::TopLeft.origin(3, 32, 30), (0, 0));
        assert_eq!(Position::Center.origin(4, 10, 9), (3, 2));
        let names = audit_sdk::schema::enum_variants::<Position>().unwrap();
        assert_eq!(names.len(), 5);
        for &name in names {
            let p: Position = audit_sdk::serde_json::from_value(name.into()).unwrap();
            assert_eq!(p.as_str(), name, "as_str spells what deserializes");
        }
        let given = audit_sdk::Params(
            audit_sdk::serde_json::json!({"position": "middle"})
                .as_object()
                .cloned()
                .unwrap(),
        );
        let e = given.get::<Position>("position").unwrap_err();
        assert!(
            e.message.contains("parameter `position`") && e.message.contains("`center`"),
            "{}",
            e.message
        );
    }
}
