//! Buffers aligned for direct I/O.

use std::ops::{Deref, DerefMut};

/// The alignment of every [`AlignedBuf`]: 4 KiB suits O_DIRECT on 512-byte and 4 KiB
/// devices alike.
pub const DIRECT_ALIGN: usize = 4096;

/// A heap buffer whose first byte sits on a 4 KiB boundary, so that it can go
/// to an O_DIRECT file (or an io_uring request on one) as it is. Its heap block never
/// moves while it lives, even when the buffer itself is moved.
pub struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        Self::filled(len, 0)
    }

    /// A buffer of `len` bytes, each `byte`.
    pub fn filled(len: usize, byte: u8) -> Self {
        if len == 0 {
            return Self {
                bytes: Vec::new(),
                start: 0,
                len: 0,
            };
        }
        let bytes = vec![byte; len + DIRECT_ALIGN];
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN);
        Self { bytes, start, len }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        for len in [0, 1, 512, 4096, 100_000] {
            let b = AlignedBuf::filled(len, 7);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 7));
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
            }
        }
    }
}
