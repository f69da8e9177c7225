//! What a server exports: one device, its name and its policy.

use crate::proto::tflag;
use qed::BlockDevice;
use std::sync::Arc;

/// Largest read or write payload accepted (32 MiB, the protocol's portable maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size advertised.
pub const PREFERRED_BLOCK: u32 = 4096;

/// The trim policy, the library's: the same for every export.
pub use qed::DiscardMode;

/// One export.
#[derive(Debug, Clone)]
pub struct Export {
    /// The device served.
    pub device: Arc<dyn BlockDevice>,
    /// Export name clients ask for ("" is the default export and always matches).
    pub name: String,
    /// Description shown by clients that ask.
    pub description: String,
    /// Refuse writes.
    pub read_only: bool,
    /// Trim policy.
    pub discard: DiscardMode,
}

impl Export {
    /// Whether a client asking for `name` gets this export.
    pub fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// Transmission flags, truthful for this export.
    pub fn flags(&self, structured: bool) -> u16 {
        let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_CACHE;
        // Every connection shares one device and a flush flushes the whole file, so
        // what one connection flushed is durable for all: multi-conn is safe.
        f |= tflag::CAN_MULTI_CONN;
        if structured {
            f |= tflag::SEND_DF;
        }
        if self.read_only {
            f |= tflag::READ_ONLY;
        } else {
            f |= tflag::SEND_FUA
                | tflag::SEND_TRIM
                | tflag::SEND_WRITE_ZEROES
                | tflag::SEND_FAST_ZERO;
        }
        f
    }
}
