//! What every target shares: the image bytes in memory, with bounded growth.

// Each target uses part of it.
#![allow(dead_code)]

use qed::{MemoryStorage, Storage};
use qed::{Image, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Arc;

/// How far an image may grow while a target runs. Clusters can be 64 MiB and tables
/// 1 GiB; growth past this fails the request like a full disk, which is an error path
/// worth taking too.
const MAX_GROWTH: u64 = 32 << 20;

/// Guest bytes read, at most, from each image.
pub const READ_CAP: u64 = 8 << 20;

/// Memory storage that refuses to grow far past the input.
#[derive(Debug)]
pub struct Capped {
    inner: MemoryStorage,
    limit: u64,
}

impl Capped {
    pub fn new(bytes: &[u8]) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryStorage::from_bytes(bytes.to_vec()),
            limit: bytes.len() as u64 + MAX_GROWTH,
        })
    }

    fn room(&self, end: Option<u64>) -> io::Result<()> {
        match end {
            Some(e) if e <= self.limit => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "fuzz growth cap",
            )),
        }
    }
}

impl Storage for Capped {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.room(offset.checked_add(buf.len() as u64))?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.room(Some(len))?;
        self.inner.set_len(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.zero_range(offset, len)
    }
}

/// Opens `storage` as an image. The backing file is never opened: a fuzzed name must not
/// reach the filesystem. The L2 cache is small, so that eviction happens.
pub fn open(storage: &Arc<Capped>, read_only: bool, repair_on_open: bool) -> qed::Result<Image> {
    let opts = OpenOptions {
        image: qed::ImageOptions {
            read_only,
            l2_cache_bytes: 64 << 10,
            repair_on_open,
            ..qed::ImageOptions::default()
        },
        no_backing: true,
        ..OpenOptions::default()
    };
    Image::open_storage(Box::new(storage.clone()), Path::new("fuzz.qed"), &opts)
}

/// A repair that reports nothing left to fix must leave an image the check finds clean,
/// with NEED_CHECK cleared.
pub fn assert_repaired(image: &Image, report: &qed::CheckReport) {
    if report.check_errors > 0 || report.corruptions_remaining() > 0 {
        return;
    }
    let after = image.check().expect("a repaired image can be checked");
    assert_eq!(
        (after.corruptions, after.check_errors),
        (0, 0),
        "after a repair that reported {report:?}: {after:?}"
    );
    assert!(
        !image.header().needs_check(),
        "the repair left NEED_CHECK set"
    );
}

/// A small deterministic generator, seeded from the input, for the requests to make.
pub struct Rng(pub u64);

impl Rng {
    pub fn from(data: &[u8]) -> Self {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for &b in data.iter().take(4096) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        Rng(h ^ data.len() as u64)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (x ^ (x >> 31)) % n.max(1)
    }
}
