//! Cluster and table geometry: how a guest offset splits into table indices.

use crate::error::{Error, Result};

/// Smallest cluster size the format allows.
pub const MIN_CLUSTER_SIZE: u32 = 4 * 1024;
/// Largest cluster size the format allows.
pub const MAX_CLUSTER_SIZE: u32 = 64 * 1024 * 1024;
/// Cluster size `qemu-img create` uses when none is given.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;
/// Smallest table size, in clusters.
pub const MIN_TABLE_SIZE: u32 = 1;
/// Largest table size, in clusters.
pub const MAX_TABLE_SIZE: u32 = 16;
/// Table size `qemu-img create` uses when none is given.
pub const DEFAULT_TABLE_SIZE: u32 = 4;
/// Table entries are rewritten in units of this many bytes, as QEMU does.
pub const SECTOR_SIZE: u64 = 512;
/// Size of one table entry in bytes.
pub const ENTRY_SIZE: u64 = 8;

/// The fixed shape of one image: cluster size and table size, with everything derived
/// from them. Every value is validated at construction, so the arithmetic here cannot
/// overflow for any offset below [`Geometry::max_image_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    cluster_size: u64,
    cluster_bits: u32,
    table_size: u32,
    /// log2 of the number of entries in one table.
    entries_bits: u32,
}

impl Geometry {
    /// Validates a cluster size and table size (both must be powers of two in range).
    pub fn new(cluster_size: u32, table_size: u32) -> Result<Self> {
        if !cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
        {
            return Err(Error::invalid_header(
                "cluster_size",
                cluster_size.into(),
                "must be a power of two from 4 KiB to 64 MiB",
            ));
        }
        if !table_size.is_power_of_two() || !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&table_size)
        {
            return Err(Error::invalid_header(
                "table_size",
                table_size.into(),
                "must be a power of two from 1 to 16",
            ));
        }
        let cluster_bits = cluster_size.trailing_zeros();
        let entries_bits = cluster_bits + table_size.trailing_zeros() - ENTRY_SIZE.trailing_zeros();
        Ok(Self {
            cluster_size: cluster_size.into(),
            cluster_bits,
            table_size,
            entries_bits,
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// Table size in clusters.
    pub fn table_size(&self) -> u32 {
        self.table_size
    }

    /// Size of one L1 or L2 table in bytes.
    pub fn table_bytes(&self) -> u64 {
        self.cluster_size * u64::from(self.table_size)
    }

    /// Number of entries in one table.
    pub fn entries_per_table(&self) -> u64 {
        1 << self.entries_bits
    }

    /// Bytes of guest space that one L2 table maps (one L1 entry's reach).
    pub fn l2_coverage(&self) -> u64 {
        // cluster_bits + entries_bits <= 26 + 27 < 64.
        1 << (self.cluster_bits + self.entries_bits)
    }

    /// Largest virtual size the tables can map, computed without overflow and capped
    /// at `u64::MAX` rounded down to 512.
    pub fn max_image_size(&self) -> u64 {
        let bits = self.cluster_bits + 2 * self.entries_bits;
        if bits >= 64 {
            !(SECTOR_SIZE - 1)
        } else {
            1 << bits
        }
    }

    /// The maximum QEMU computes for this geometry. QEMU's formula wraps in 64 bits, so
    /// for very large geometries it is 0 and QEMU refuses every image of that shape.
    pub fn qemu_max_image_size(&self) -> u64 {
        let bits = self.cluster_bits + 2 * self.entries_bits;
        if bits >= 64 {
            0
        } else {
            1 << bits
        }
    }

    /// Index into the L1 table for a guest offset.
    pub fn l1_index(&self, pos: u64) -> u64 {
        pos >> (self.cluster_bits + self.entries_bits)
    }

    /// Index into an L2 table for a guest offset.
    pub fn l2_index(&self, pos: u64) -> u64 {
        (pos >> self.cluster_bits) & (self.entries_per_table() - 1)
    }

    /// Offset of `pos` inside its cluster.
    pub fn offset_in_cluster(&self, pos: u64) -> u64 {
        pos & (self.cluster_size - 1)
    }

    /// Start of the cluster holding `pos`.
    pub fn cluster_start(&self, pos: u64) -> u64 {
        pos & !(self.cluster_size - 1)
    }

    /// Whether `pos` is cluster aligned.
    pub fn is_cluster_aligned(&self, pos: u64) -> bool {
        self.offset_in_cluster(pos) == 0
    }

    /// Number of clusters needed to hold `bytes` (rounding up, without overflow).
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        (bytes >> self.cluster_bits) + u64::from(self.offset_in_cluster(bytes) != 0)
    }

    /// Number of L1 entries needed to map an image of `image_size` bytes.
    pub fn l1_entries_for(&self, image_size: u64) -> u64 {
        let cover_bits = self.cluster_bits + self.entries_bits;
        (image_size >> cover_bits) + u64::from(image_size & ((1 << cover_bits) - 1) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_maps_64_tib() {
        let g = Geometry::new(DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(g.table_bytes(), 256 * 1024);
        assert_eq!(g.entries_per_table(), 32768);
        assert_eq!(g.l2_coverage(), 2 << 30);
        assert_eq!(g.max_image_size(), 64 << 40);
        assert_eq!(g.qemu_max_image_size(), 64 << 40);
    }

    #[test]
    fn address_split_matches_format() {
        let g = Geometry::new(4096, 1).unwrap();
        // 512 entries per table, 2 MiB per L2.
        let pos = 3 * (2 << 20) + 5 * 4096 + 17;
        assert_eq!(g.l1_index(pos), 3);
        assert_eq!(g.l2_index(pos), 5);
        assert_eq!(g.offset_in_cluster(pos), 17);
        assert_eq!(g.cluster_start(pos), pos - 17);
    }

    #[test]
    fn rejects_bad_sizes() {
        for (c, t) in [
            (2048, 4),
            (65536 + 1, 4),
            (128 << 20, 4),
            (65536, 0),
            (65536, 3),
            (65536, 32),
        ] {
            assert!(Geometry::new(c, t).is_err(), "{c} {t}");
        }
    }

    #[test]
    fn huge_geometry_does_not_overflow() {
        let g = Geometry::new(MAX_CLUSTER_SIZE, MAX_TABLE_SIZE).unwrap();
        // 26 + 2 * 27 = 80 bits: past u64, QEMU wraps to 0.
        assert_eq!(g.qemu_max_image_size(), 0);
        assert_eq!(g.max_image_size(), !511u64);
        assert_eq!(g.l1_entries_for(u64::MAX), 1 << 11);
        assert_eq!(g.clusters_for(u64::MAX), 1 << 38);
    }

    #[test]
    fn clusters_for_rounds_up_correctly() {
        let g = Geometry::new(4096, 4).unwrap();
        assert_eq!(g.clusters_for(0), 0);
        assert_eq!(g.clusters_for(1), 1);
        assert_eq!(g.clusters_for(4096), 1);
        assert_eq!(g.clusters_for(4097), 2);
    }
}
