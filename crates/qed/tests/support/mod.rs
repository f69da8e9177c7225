//! What the library's integration tests share: little-endian fields of an image's bytes
//! (headers and table entries, as the tests read and damage them) and reading a device
//! back. Each test file takes the parts it needs.

#![allow(dead_code)]

use qed::{BlockDevice, Storage};

/// A byte offset into an image's bytes, as the tests write them: `usize` for header
/// fields, `u64` for file offsets.
pub trait Offset: Copy {
    fn at(self) -> usize;
}

impl Offset for usize {
    fn at(self) -> usize {
        self
    }
}

impl Offset for u64 {
    fn at(self) -> usize {
        usize::try_from(self).expect("an offset inside the image's bytes")
    }
}

/// The little-endian u64 at `off`.
pub fn get_u64(b: &[u8], off: impl Offset) -> u64 {
    let off = off.at();
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Stores `v` little-endian at `off`.
pub fn put_u64(b: &mut [u8], off: impl Offset, v: u64) {
    let off = off.at();
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Stores `v` little-endian at `off`.
pub fn put_u32(b: &mut [u8], off: impl Offset, v: u32) {
    let off = off.at();
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// The little-endian u64 at `at` in `storage`.
pub fn read_u64(storage: &dyn Storage, at: u64) -> u64 {
    let mut b = [0u8; 8];
    storage.read_at(&mut b, at).unwrap();
    u64::from_le_bytes(b)
}

/// Writes `v` little-endian at `at` in `storage`.
pub fn write_u64(storage: &dyn Storage, at: u64, v: u64) {
    storage.write_at(&v.to_le_bytes(), at).unwrap();
}

/// `len` bytes of `dev` from `off`.
pub fn read(dev: &dyn BlockDevice, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    dev.read_at(&mut buf, off).unwrap();
    buf
}

/// All of `dev`.
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    read(dev, 0, dev.size())
}
