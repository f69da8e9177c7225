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
    }

    #[test]
    fn formats_and_sizes() {
        assert_eq!(format("qed"), Ok(Format::Qed));
        assert!(format("vmdk").unwrap_err().contains("vmdk"));
        assert_eq!(memory("16M"), Ok(16 << 20));
        assert!(size("lots").unwrap_err().contains("lots"));
    }
}
