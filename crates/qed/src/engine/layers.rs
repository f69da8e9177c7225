//! The backing chain as the open image reads it: the backing file it was opened (or
//! last given) with, which layer of that file's chain unallocated clusters read through
//! to, and the name the header stores now. Behind one type whose methods are the only
//! way in.
//!
//! The invariant it keeps: the depth changes only together with the header (the caller
//! has rewritten it, durably, first), and only ever moves down the chain or to "none",
//! so that a read that began before a cut still finds the layer it read opened. A new
//! backing file (`&mut`, the image to itself) starts over at depth 1.

use crate::block::{BlockDevice, Format};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::RwLock;

/// The backing file of an image, as named in its header and as opened.
#[derive(Debug)]
pub struct Backing {
    /// The name stored in the header.
    pub name: String,
    /// The name resolved against the image's directory.
    pub path: PathBuf,
    /// The declared format: `Some(Raw)` when NO_PROBE is set, else `None` (probed).
    pub declared_format: Option<Format>,
    /// The opened device (absent when opened without the backing chain).
    pub device: Option<Box<dyn BlockDevice>>,
}

/// [`BackingChain::depth`] once the image has no backing file left.
pub(super) const NO_BACKING: u32 = 0;

/// The backing file, the layer reads go through to, and the name the header stores.
#[derive(Debug)]
pub(super) struct BackingChain {
    opened: Option<Backing>,
    /// Which layer of `opened`'s chain unallocated clusters read through to: 1 is
    /// `opened` itself, deeper after a stream cut the layers above a base off,
    /// [`NO_BACKING`] once the header names no backing file.
    depth: AtomicU32,
    /// The backing file name the header stores now (it changes when a stream cuts
    /// layers off while the image is open; `opened` keeps the name it was opened with).
    header_name: RwLock<Option<String>>,
}

impl BackingChain {
    /// The chain of an image opened with `backing`.
    pub(super) fn at_open(backing: Option<Backing>) -> Self {
        Self {
            header_name: RwLock::new(backing.as_ref().map(|b| b.name.clone())),
            opened: backing,
            depth: AtomicU32::new(1),
        }
    }

    /// The layer unallocated clusters read through to, counted from the opened file.
    pub(super) fn depth(&self) -> u32 {
        self.depth.load(Ordering::Acquire)
    }

    /// Whether the image was opened (or last given) with a backing file: its entries
    /// follow their data to disk even after a cut.
    pub(super) fn opened_with_one(&self) -> bool {
        self.opened.is_some()
    }

    /// The backing file, unless a cut left the image without one.
    pub(super) fn file(&self) -> Option<&Backing> {
        if self.depth() == NO_BACKING {
            return None;
        }
        self.opened.as_ref()
    }

    /// Whether the header names a backing file (opened or not).
    #[inline]
    pub(super) fn present(&self) -> bool {
        self.opened.is_some() && self.depth() != NO_BACKING
    }

    /// The device unallocated clusters read through to. `None` without one, or when the
    /// image was opened without its backing chain.
    pub(super) fn device(&self) -> Option<&dyn BlockDevice> {
        let mut dev = self.opened.as_ref()?.device.as_deref()?;
        match self.depth() {
            NO_BACKING => None,
            depth => {
                for _ in 1..depth {
                    dev = dev.backing()?;
                }
                Some(dev)
            }
        }
    }

    /// The backing file name the header stores now.
    pub(super) fn header_name(&self) -> Option<String> {
        self.header_name
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records the name the header stores now (the caller has written it durably).
    pub(super) fn set_header_name(&self, name: Option<String>) {
        *self.header_name.write().unwrap_or_else(|p| p.into_inner()) = name;
    }

    /// A new backing file (or none), already recorded in the header: reads go through
    /// to it from now on.
    pub(super) fn replace(&mut self, backing: Option<Backing>) {
        self.opened = backing;
        self.depth.store(1, Ordering::Release);
    }

    /// Makes the layer `depth` down from the current one the one reads go through to
    /// (`None`: no backing file), once the header says so. The layers no longer read
    /// give up their file locks, left to other processes; their devices stay open, as
    /// a read that began before the cut may still be reading them.
    pub(super) fn cut(&self, depth: Option<u32>) {
        let current = self.depth();
        let depth = match depth {
            None => NO_BACKING,
            Some(depth) => {
                debug_assert!(depth >= 1 && current != NO_BACKING, "a cut only goes down");
                current + depth - 1
            }
        };
        self.depth.store(depth, Ordering::Release);
        let mut layer = self.opened.as_ref().and_then(|b| b.device.as_deref());
        let mut at = 1;
        while let Some(dev) = layer {
            if at >= current && (depth == NO_BACKING || at < depth) {
                dev.release_file_locks();
            }
            layer = dev.backing();
            at += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backing() -> Backing {
        Backing {
            name: "base.qed".into(),
            path: PathBuf::from("base.qed"),
            declared_format: None,
            device: None,
        }
    }

    #[test]
    fn a_cut_goes_down_the_chain_or_to_none() {
        let chain = BackingChain::at_open(Some(backing()));
        assert!(chain.present());
        assert_eq!(chain.depth(), 1);
        chain.cut(Some(3));
        assert_eq!(chain.depth(), 3);
        chain.cut(Some(2));
        assert_eq!(chain.depth(), 4, "depths count from the current layer");
        chain.cut(None);
        assert!(!chain.present() && chain.file().is_none());
        // Entries still follow their data, as they did for the file opened with.
        assert!(chain.opened_with_one());
    }

    #[test]
    fn a_new_backing_file_starts_over() {
        let mut chain = BackingChain::at_open(None);
        assert!(!chain.present() && !chain.opened_with_one());
        chain.replace(Some(backing()));
        chain.set_header_name(Some("base.qed".into()));
        assert_eq!(chain.depth(), 1);
        assert_eq!(chain.header_name().as_deref(), Some("base.qed"));
        assert_eq!(chain.file().map(|b| b.name.as_str()), Some("base.qed"));
    }
}
