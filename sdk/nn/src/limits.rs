//! Size limits on what `audit` reads and allocates for untrusted input: model files, external
//! data, datasets, and tensors whose shape comes from data (ConstantOfShape, Tile, Expand, ...).
//!
//! One knob raises them all: `AUDIT_MAX_INPUT_BYTES` (bytes, or with a K, M or G suffix, powers of
//! 1024). Files are read through a bounded reader: a file (or device, or pipe) larger than the
//! limit is refused after reading at most limit + 1 bytes, never read to its end.

use std::io::Read;
use std::path::Path;

/// The environment variable that raises (or lowers) the input size limit.
pub const MAX_INPUT_BYTES_ENV: &str = "AUDIT_MAX_INPUT_BYTES";

/// The default limit on one input file or one decoded array: 2 GiB (protobuf's own limit for a
/// model).
pub const DEFAULT_MAX_INPUT_BYTES: u64 = 2 << 30;

/// The smallest limit a tensor computed from data may reach, whatever the input limit: 4 GiB.
const MIN_TENSOR_BYTES: u64 = 4 << 30;

/// Parses `2147483648`, `512M`, `4G`, `64k` (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()?.to_ascii_uppercase() {
        'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult).filter(|&n| n > 0)
}

/// The input size limit: `AUDIT_MAX_INPUT_BYTES` when set and valid, else
/// [`DEFAULT_MAX_INPUT_BYTES`].
pub fn max_input_bytes() -> u64 {
    std::env::var(MAX_INPUT_BYTES_ENV)
        .ok()
        .and_then(|s| parse_size(&s))
        .unwrap_or(DEFAULT_MAX_INPUT_BYTES)
}

/// Most bytes one tensor whose shape comes from the model's data may take: the input limit, and
/// at least 4 GiB.
pub fn max_tensor_bytes() -> u64 {
    max_input_bytes().max(MIN_TENSOR_BYTES)
}

/// The hint printed with a size-limit error.
pub fn raise_hint() -> String {
    format!(
        "the limit is {} bytes; set {MAX_INPUT_BYTES_ENV} (bytes, or e.g. 8G) to raise it if the input is genuine",
        max_input_bytes()
    )
}

/// Why a bounded read failed.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    /// Larger than `limit` bytes (`size` when the file system says how large).
    TooLarge {
        size: Option<u64>,
        limit: u64,
    },
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::TooLarge { size: Some(s), limit } => write!(
                f,
                "{s} bytes, larger than the {limit}-byte input limit ({MAX_INPUT_BYTES_ENV} raises it)"
            ),
            ReadError::TooLarge { size: None, limit } => write!(
                f,
                "more than the {limit}-byte input limit ({MAX_INPUT_BYTES_ENV} raises it)"
            ),
        }
    }
}

impl std::error::Error for ReadError {}

/// Reads at most `limit` bytes from `r`; more is [`ReadError::TooLarge`].
pub fn read_to_limit(mut r: impl Read, limit: u64) -> Result<Vec<u8>, ReadError> {
    // In chunks, checked before they are kept: the buffer never holds more than `limit` bytes.
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let n = match r.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadError::Io(e)),
        };
        if out.len() as u64 + n as u64 > limit {
            return Err(ReadError::TooLarge { size: None, limit });
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// Reads a whole file, refusing one larger than [`max_input_bytes`] (checked from its metadata
/// first, then by reading at most limit + 1 bytes, for devices and pipes).
pub fn read_file(path: &Path) -> Result<Vec<u8>, ReadError> {
    read_file_limited(path, max_input_bytes())
}

/// [`read_file`] with an explicit limit.
pub fn read_file_limited(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let f = std::fs::File::open(path).map_err(ReadError::Io)?;
    let meta = f.metadata().map_err(ReadError::Io)?;
    if meta.is_dir() {
        return Err(ReadError::Io(std::io::Error::other("is a folder, not a file")));
    }
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_char_device() || t.is_block_device() || t.is_socket() {
            return Err(ReadError::Io(std::io::Error::other("is a device, not a file")));
        }
    }
    if meta.is_file() {
        if meta.len() > limit {
            return Err(ReadError::TooLarge {
                size: Some(meta.len()),
                limit,
            });
        }
        // A regular file: one allocation of its size; `take` still bounds a file that grows.
        let mut out = Vec::with_capacity(meta.len() as usize);
        f.take(limit.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(ReadError::Io)?;
        if out.len() as u64 > limit {
            return Err(ReadError::TooLarge { size: None, limit });
        }
        return Ok(out);
    }
    read_to_limit(f, limit)
}

/// Checks that a tensor of `shape` and `elem_size`-byte elements stays within
/// [`max_tensor_bytes`]; the message names the shape.
pub fn check_tensor_alloc(shape: &[i64], elem_size: usize) -> Result<(), String> {
    let limit = max_tensor_bytes();
    let mut bytes = elem_size as u64;
    for &d in shape {
        if d < 0 {
            return Err(format!("negative dimension in {shape:?}"));
        }
        bytes = bytes.saturating_mul(d as u64);
    }
    if bytes > limit {
        return Err(format!(
            "output shape {shape:?} needs {bytes} bytes, more than the {limit}-byte limit ({MAX_INPUT_BYTES_ENV} raises it): refused"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finding_16_reads_are_bounded_even_for_endless_files() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("4g"), Some(4 << 30));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("0"), None);
        // /dev/zero never ends: a device is refused before any read.
        let e = read_file_limited(Path::new("/dev/zero"), 1000).unwrap_err();
        assert!(e.to_string().contains("is a device"), "{e}");
        // An endless stream (as a pipe would be) stops once past the limit.
        let e = read_to_limit(std::io::repeat(0), 1000).unwrap_err();
        assert!(e.to_string().contains("1000-byte input limit"), "{e}");
        assert!(e.to_string().contains(MAX_INPUT_BYTES_ENV), "{e}");
        assert_eq!(read_to_limit(&[7u8; 1000][..], 1000).unwrap().len(), 1000);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [1u8; 10]).unwrap();
        assert_eq!(read_file_limited(&p, 10).unwrap().len(), 10);
        let e = read_file_limited(&p, 9).unwrap_err().to_string();
        assert!(e.contains("10 bytes, larger than the 9-byte"), "{e}");
        assert!(read_file_limited(dir.path(), 9)
            .unwrap_err()
            .to_string()
            .contains("folder"));
    }

    #[test]
    fn finding_3_data_driven_allocations_are_capped() {
        assert!(check_tensor_alloc(&[2, 3], 4).is_ok());
        let e = check_tensor_alloc(&[1 << 20, 1 << 20, 1 << 20], 4).unwrap_err();
        assert!(e.contains("refused") && e.contains(MAX_INPUT_BYTES_ENV), "{e}");
        assert!(check_tensor_alloc(&[-1], 4).is_err());
    }
}
