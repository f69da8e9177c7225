//! L1 and L2 table entries.

/// What one L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated: reads from the backing file, or as zeros without one.
    Unallocated,
    /// A zero cluster: reads as zeros and hides the backing file.
    Zero,
    /// Data at this file offset.
    Data(u64),
}

/// Raw value of an unallocated entry.
pub const UNALLOCATED: u64 = 0;
/// Raw value of a zero-cluster entry.
pub const ZERO_CLUSTER: u64 = 1;
/// Entries in one 512-byte sector of a table: the unit tables are written in.
pub const ENTRIES_PER_SECTOR: u64 = 64;

impl L2Entry {
    /// Interprets a raw entry value.
    pub fn decode(raw: u64) -> Self {
        match raw {
            UNALLOCATED => L2Entry::Unallocated,
            ZERO_CLUSTER => L2Entry::Zero,
            off => L2Entry::Data(off),
        }
    }

    /// The raw value stored on disk.
    pub fn encode(self) -> u64 {
        match self {
            L2Entry::Unallocated => UNALLOCATED,
            L2Entry::Zero => ZERO_CLUSTER,
            L2Entry::Data(off) => off,
        }
    }
}

/// Decodes little-endian entries from `bytes` into `out` (as many as both hold).
pub fn decode_entries(bytes: &[u8], out: &mut [u64]) {
    for (chunk, e) in bytes.chunks_exact(8).zip(out.iter_mut()) {
        let mut a = [0; 8];
        a.copy_from_slice(chunk);
        *e = u64::from_le_bytes(a);
    }
}

/// Encodes entries as little-endian bytes into `out` (as many as both hold).
pub fn encode_entries(entries: &[u64], out: &mut [u8]) {
    for (chunk, e) in out.chunks_exact_mut(8).zip(entries) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_kinds() {
        assert_eq!(L2Entry::decode(0), L2Entry::Unallocated);
        assert_eq!(L2Entry::decode(1), L2Entry::Zero);
        assert_eq!(L2Entry::decode(0x50000), L2Entry::Data(0x50000));
        for e in [L2Entry::Unallocated, L2Entry::Zero, L2Entry::Data(4096)] {
            assert_eq!(L2Entry::decode(e.encode()), e);
        }
    }

    #[test]
    fn entries_round_trip() {
        let entries = [0u64, 1, 0x1234_5678_9abc_def0, u64::MAX];
        let mut bytes = [0u8; 32];
        encode_entries(&entries, &mut bytes);
        assert_eq!(
            &bytes[16..24],
            &[0xf0, 0xde, 0xbc, 0x9a, 0x78, 0x56, 0x34, 0x12]
        );
        let mut back = [0u64; 4];
        decode_entries(&bytes, &mut back);
        assert_eq!(back, entries);
    }
}
