//! Option values typed when parsed: clap calls these, so a bad value is refused before
//! the command starts, naming its flag, and `run` functions receive plain values.

use crate::units::parse_size;
use qed::{DiscardMode, Format};
use qed_nbd::TlsMode;

/// An image format: raw, qed or qcow2.
pub fn format(s: &str) -> Result<Format, String> {
    s.parse().map_err(|e: qed::Error| e.to_string())
}

/// A size such as `64k` or `1.5G` (see [`parse_size`]).
pub fn size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A size of memory, which must fit the address space.
pub fn memory(s: &str) -> Result<usize, String> {
    usize::try_from(size(s)?).map_err(|_| format!("{s} is too large"))
}

/// A rate in bytes per second (k, M, G suffixes): more than 0.
pub fn rate(s: &str) -> Result<u64, String> {
    match size(s)? {
        0 => Err("must be more than 0 bytes per second".into()),
        r => Ok(r),
    }
}

/// A new size, or a change to the current one (`resize`'s SIZE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeChange {
    /// `SIZE`: this size.
    To(u64),
    /// `+SIZE`: this much larger.
    Grow(u64),
    /// `-SIZE`: this much smaller.
    Shrink(u64),
}

/// `SIZE`, `+SIZE` or `-SIZE`.
pub fn size_change(s: &str) -> Result<SizeChange, String> {
    Ok(if let Some(d) = s.strip_prefix('+') {
        SizeChange::Grow(size(d)?)
    } else if let Some(d) = s.strip_prefix('-') {
        SizeChange::Shrink(size(d)?)
    } else {
        SizeChange::To(size(s)?)
    })
}

/// What an export does with discards: `ignore` (or `off`) and `unmap` (or `on`), as
/// qemu-nbd spells them.
pub fn discard(s: &str) -> Result<DiscardMode, String> {
    match s {
        "ignore" | "off" => Ok(DiscardMode::Ignore),
        "unmap" | "on" => Ok(DiscardMode::Unmap),
        _ => Err("use ignore or unmap".into()),
    }
}

/// `--tls`: off, on (for clients that ask) or require.
pub fn tls_mode(s: &str) -> Result<TlsMode, String> {
    match s {
        "off" => Ok(TlsMode::Off),
        "on" => Ok(TlsMode::On),
        "require" => Ok(TlsMode::Require),
        _ => Err("use off, on or require".into()),
    }
}

/// The host cache mode of an export's image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Cache {
    /// Through the page cache.
    Writeback,
    /// O_DIRECT.
    #[value(name = "none")]
    Direct,
}

impl Cache {
    /// Whether the image is opened with O_DIRECT.
    pub fn direct(self) -> bool {
        self == Cache::Direct
    }
}

/// The cache mode of `qed convert`'s destination, as qemu-img convert's `-t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvertCache {
    /// No flush: the system writes the copy back in its own time.
    Unsafe,
    /// Flushed before the command returns.
    Writeback,
    /// O_DIRECT, flushed.
    Direct,
}

/// `-t` of `qed convert`: unsafe, writeback or none.
pub fn convert_cache(s: &str) -> Result<ConvertCache, String> {
    match s {
        "unsafe" => Ok(ConvertCache::Unsafe),
        "writeback" => Ok(ConvertCache::Writeback),
        "none" => Ok(ConvertCache::Direct),
        c => Err(format!(
            "invalid cache mode '{c}' for the destination: use unsafe, writeback or none"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discard_takes_qemu_spellings() {
        assert_eq!(discard("off"), Ok(DiscardMode::Ignore));
        assert_eq!(discard("ignore"), Ok(DiscardMode::Ignore));
        assert_eq!(discard("on"), Ok(DiscardMode::Unmap));
        assert_eq!(discard("unmap"), Ok(DiscardMode::Unmap));
        assert!(discard("trim").is_err());
        assert_eq!(rate("4M"), Ok(4 << 20));
        assert_eq!(size_change("+1M"), Ok(SizeChange::Grow(1 << 20)));
        assert_eq!(size_change("-64k"), Ok(SizeChange::Shrink(64 << 10)));
        assert_eq!(size_change("2G"), Ok(SizeChange::To(2 << 30)));
        assert!(size_change("lots").unwrap_err().contains("lots"));
        assert!(rate("0").unwrap_err().contains("more than 0"));
        assert!(convert_cache("writethrough")
            .unwrap_err()
            .contains("invalid cache mode"));
    }

    #[test]
    fn formats_and_sizes() {
        assert_eq!(format("qed"), Ok(Format::Qed));
        assert!(format("vmdk").unwrap_err().contains("vmdk"));
        assert_eq!(memory("16M"), Ok(16 << 20));
        assert!(size("lots").unwrap_err().contains("lots"));
    }
}
