//! What a writer of a new qcow2 (version 3) image decides itself: the options of the
//! image and its header cluster. The format's own rules (geometry, entries, refcount
//! blocks) are in `format::qcow2`. Pure: no I/O.

use crate::block::Format;
use crate::error::{Error, Result};

use crate::format::qcow2::{extension, MAGIC, MAX_BACKING_NAME, MAX_L1_BYTES};
pub(crate) use crate::format::qcow2::{refcount_block, Qcow2Geometry as Geometry};
pub(crate) use crate::format::qcow2::{COPIED, OFFSET_MASK, ZERO};
use crate::format::qcow2::{REFCOUNT_ORDER, V3_HEADER_LEN as HEADER_LEN};

const EXT_BACKING_FORMAT: u32 = extension::BACKING_FORMAT;
const MAX_L1_ENTRIES: u64 = MAX_L1_BYTES / 8;
/// The smallest and largest cluster sizes qcow2 allows.
pub const QCOW2_MIN_CLUSTER: u64 = 512;
/// See [`QCOW2_MIN_CLUSTER`].
pub const QCOW2_MAX_CLUSTER: u64 = 2 << 20;

/// What a new qcow2 image is made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2CreateOptions {
    /// Virtual size in bytes; rounded up to a multiple of 512, as QEMU's sizes are.
    pub size: u64,
    /// Cluster size: a power of two from 512 bytes to 2 MiB (64 KiB by default).
    pub cluster_size: u64,
    /// The backing file's name as the header stores it (relative to the image's
    /// directory, or absolute).
    pub backing_file: Option<String>,
    /// The backing file's format, recorded in the header so that it is not probed.
    pub backing_format: Option<Format>,
}

impl Qcow2CreateOptions {
    /// Options for an image of `size` bytes with the default cluster size and no
    /// backing file.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            cluster_size: 64 << 10,
            backing_file: None,
            backing_format: None,
        }
    }

    /// Checks the options, returning the geometry they make: every refusal comes
    /// before a file is created.
    pub fn validate(&self) -> Result<Geometry> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(QCOW2_MIN_CLUSTER..=QCOW2_MAX_CLUSTER).contains(&cs) {
            return Err(Error::invalid_argument(format!(
                "invalid cluster_size {cs}: a qcow2 cluster size is a power of two from 512 \
                 bytes to 2 MiB"
            )));
        }
        let size = self.size.checked_next_multiple_of(512).ok_or_else(|| {
            Error::invalid_argument(format!("image size {} is too large", self.size))
        })?;
        let geometry = Geometry {
            cluster_bits: cs.trailing_zeros(),
            size,
        };
        if geometry.l1_entries() > MAX_L1_ENTRIES {
            return Err(Error::invalid_argument(format!(
                "image size {size} is too large for qcow2 clusters of {cs} bytes (its L1 \
                 table would exceed 32 MiB): use larger clusters"
            )));
        }
        if let Some(name) = &self.backing_file {
            if name.is_empty() || name.len() > MAX_BACKING_NAME {
                return Err(Error::invalid_argument(format!(
                    "invalid backing file name '{name}': qcow2 takes 1 to 1023 bytes"
                )));
            }
        }
        // The header cluster must hold the backing name and format.
        self.header(&geometry, 0, 0, 0)?;
        Ok(geometry)
    }

    /// The header cluster: the version 3 header, the backing format extension and the
    /// backing file name, zero-padded to one cluster.
    pub(crate) fn header(
        &self,
        g: &Geometry,
        l1_offset: u64,
        refcount_table_offset: u64,
        refcount_table_clusters: u64,
    ) -> Result<Vec<u8>> {
        let mut h = Vec::with_capacity(g.cluster_size() as usize);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&3u32.to_be_bytes());
        h.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset, set below
        h.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size, set below
        h.extend_from_slice(&g.cluster_bits.to_be_bytes());
        h.extend_from_slice(&g.size.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
        h.extend_from_slice(&(g.l1_entries() as u32).to_be_bytes());
        h.extend_from_slice(&l1_offset.to_be_bytes());
        h.extend_from_slice(&refcount_table_offset.to_be_bytes());
        h.extend_from_slice(&(refcount_table_clusters as u32).to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
        h.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
        h.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
        h.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
        h.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
        h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        h.extend_from_slice(&(HEADER_LEN as u32).to_be_bytes());
        h.resize(HEADER_LEN, 0); // compression type zlib, and padding
        if let Some(format) = self.backing_format.filter(|_| self.backing_file.is_some()) {
            let name = format.name().as_bytes();
            h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            h.extend_from_slice(&(name.len() as u32).to_be_bytes());
            h.extend_from_slice(name);
            h.resize(h.len().next_multiple_of(8), 0);
        }
        h.extend_from_slice(&[0; 8]); // end of the extensions
        if let Some(name) = &self.backing_file {
            let at = h.len() as u64;
            h[8..16].copy_from_slice(&at.to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            h.extend_from_slice(name.as_bytes());
        }
        if h.len() as u64 > g.cluster_size() {
            return Err(Error::invalid_argument(format!(
                "the backing file name and format ({} bytes of header) do not fit in one \
                 qcow2 cluster of {} bytes: use larger clusters",
                h.len(),
                g.cluster_size()
            )));
        }
        h.resize(g.cluster_size() as usize, 0);
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(cs: u64, size: u64) -> Geometry {
        Qcow2CreateOptions {
            cluster_size: cs,
            ..Qcow2CreateOptions::new(size)
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn cluster_sizes_outside_qcow2s_range_are_refused() {
        for cs in [0, 256, 1000, 4 << 20] {
            let o = Qcow2CreateOptions {
                cluster_size: cs,
                ..Qcow2CreateOptions::new(1 << 20)
            };
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains("cluster_size"), "{e}");
        }
        for cs in [512, 4096, 65536, 2 << 20] {
            geometry(cs, 1 << 30);
        }
    }

    #[test]
    fn refcount_clusters_cover_themselves() {
        let g = geometry(512, 1 << 30);
        for used in [1, 2, 255, 256, 257, 10_000, 65_535] {
            let (b, t) = g.refcount_clusters(used);
            assert!(b * g.refcounts_per_block() >= used + b + t);
            assert!(t * g.cluster_size() >= b * 8);
        }
    }

    #[test]
    fn geometry_matches_qemus() {
        let g = geometry(65536, 1 << 30);
        assert_eq!(g.l2_span(), 512 << 20);
        assert_eq!(g.l1_entries(), 2);
        assert_eq!(g.l1_clusters(), 1);
        let g = geometry(512, 1000);
        assert_eq!(g.size, 1024);
    }

    #[test]
    fn the_header_holds_the_backing_name_and_format() {
        let o = Qcow2CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some(Format::Raw),
            ..Qcow2CreateOptions::new(1 << 20)
        };
        let g = o.validate().unwrap();
        let h = o.header(&g, 0x10000, 0x20000, 1).unwrap();
        assert_eq!(&h[..4], b"QFI\xfb");
        let at = u64::from_be_bytes(h[8..16].try_into().unwrap()) as usize;
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        assert_eq!(&h[at..at + len], b"base.raw");
        assert_eq!(&h[112..116], &EXT_BACKING_FORMAT.to_be_bytes());
    }

    #[test]
    fn a_name_too_long_for_the_header_cluster_is_refused() {
        let o = Qcow2CreateOptions {
            cluster_size: 512,
            backing_file: Some("x".repeat(600)),
            ..Qcow2CreateOptions::new(1 << 20)
        };
        assert!(o.validate().is_err());
    }
}
