//! The 64-byte header at offset 0 and the rules that make one valid.

use super::geometry::{Geometry, SECTOR_SIZE};
use crate::error::{Error, Result};

/// The four magic bytes at offset 0: "QED\0".
pub const MAGIC: [u8; 4] = *b"QED\0";
/// Encoded length of the header.
pub const HEADER_LEN: usize = 64;
/// Longest backing file name accepted, in bytes. QEMU keeps the name in a 4096-byte
/// buffer with a terminating NUL, so it refuses 4096 and longer.
pub const MAX_BACKING_NAME_LEN: u32 = 4095;

/// Incompatible feature bits (`features`).
pub mod features {
    /// The image has a backing file.
    pub const BACKING_FILE: u64 = 0x01;
    /// The metadata may be inconsistent: check before trusting it.
    pub const NEED_CHECK: u64 = 0x02;
    /// The backing file is raw; never probe its format.
    pub const BACKING_FORMAT_NO_PROBE: u64 = 0x04;
    /// Every incompatible bit this implementation understands.
    pub const KNOWN: u64 = BACKING_FILE | NEED_CHECK | BACKING_FORMAT_NO_PROBE;
    /// Every auto-clear bit this implementation understands (none are defined).
    pub const KNOWN_AUTOCLEAR: u64 = 0;
}

/// A decoded header. Decoding only checks the magic; [`Header::validate`] applies the
/// rest of the format's rules against the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Table size in clusters.
    pub table_size: u32,
    /// Header area size in clusters.
    pub header_size: u32,
    /// Incompatible feature bits.
    pub features: u64,
    /// Compatible feature bits.
    pub compat_features: u64,
    /// Auto-clear feature bits.
    pub autoclear_features: u64,
    /// File offset of the L1 table.
    pub l1_table_offset: u64,
    /// Virtual disk size in bytes.
    pub image_size: u64,
    /// File offset of the backing file name.
    pub backing_filename_offset: u32,
    /// Length of the backing file name in bytes.
    pub backing_filename_size: u32,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// A header as `qemu-img create` writes it: one header cluster, the L1 table right
    /// after it, and the backing name (if any) right after the 64 header bytes.
    pub fn new_for_create(
        geometry: Geometry,
        image_size: u64,
        backing_name_len: Option<u32>,
        backing_is_raw: bool,
    ) -> Self {
        let mut features = 0;
        let (backing_filename_offset, backing_filename_size) = match backing_name_len {
            Some(len) => {
                features |= features::BACKING_FILE;
                if backing_is_raw {
                    features |= features::BACKING_FORMAT_NO_PROBE;
                }
                (HEADER_LEN as u32, len)
            }
            None => (0, 0),
        };
        Header {
            cluster_size: geometry.cluster_size() as u32,
            table_size: geometry.table_size(),
            header_size: 1,
            features,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: geometry.cluster_size(),
            image_size,
            backing_filename_offset,
            backing_filename_size,
        }
    }

    /// Decodes the first 64 bytes of an image. Fails only on a wrong magic.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self> {
        if bytes[0..4] != MAGIC {
            let mut found = [0; 4];
            found.copy_from_slice(&bytes[0..4]);
            return Err(Error::BadMagic {
                file: String::new(),
                found,
            });
        }
        Ok(Header {
            cluster_size: u32_at(bytes, 0x04),
            table_size: u32_at(bytes, 0x08),
            header_size: u32_at(bytes, 0x0C),
            features: u64_at(bytes, 0x10),
            compat_features: u64_at(bytes, 0x18),
            autoclear_features: u64_at(bytes, 0x20),
            l1_table_offset: u64_at(bytes, 0x28),
            image_size: u64_at(bytes, 0x30),
            backing_filename_offset: u32_at(bytes, 0x38),
            backing_filename_size: u32_at(bytes, 0x3C),
        })
    }

    /// Encodes the header into its 64 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[0x04..0x08].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[0x08..0x0C].copy_from_slice(&self.table_size.to_le_bytes());
        b[0x0C..0x10].copy_from_slice(&self.header_size.to_le_bytes());
        b[0x10..0x18].copy_from_slice(&self.features.to_le_bytes());
        b[0x18..0x20].copy_from_slice(&self.compat_features.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[0x28..0x30].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[0x30..0x38].copy_from_slice(&self.image_size.to_le_bytes());
        b[0x38..0x3C].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[0x3C..0x40].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }

    /// Whether the image names a backing file.
    pub fn has_backing_file(&self) -> bool {
        self.features & features::BACKING_FILE != 0
    }

    /// Whether the NEED_CHECK bit is set.
    pub fn needs_check(&self) -> bool {
        self.features & features::NEED_CHECK != 0
    }

    /// Whether the backing file is declared raw (never probed).
    pub fn backing_is_raw(&self) -> bool {
        self.features & features::BACKING_FORMAT_NO_PROBE != 0
    }

    /// Size of the header area in bytes. Only meaningful after [`Header::validate`].
    pub fn header_bytes(&self) -> u64 {
        u64::from(self.header_size) * u64::from(self.cluster_size)
    }

    /// Applies every rule of the format to this header, for a file of `file_len` bytes.
    /// Returns the geometry on success; each failure names the field and its value.
    pub fn validate(&self, file_len: u64) -> Result<Geometry> {
        let unknown = self.features & !features::KNOWN;
        if unknown != 0 {
            return Err(Error::UnsupportedFeatures {
                file: String::new(),
                bits: unknown,
            });
        }
        let geometry = Geometry::new(self.cluster_size, self.table_size)?;
        if self.header_size == 0 {
            return Err(Error::invalid_header(
                "header_size",
                0,
                "must be at least one cluster",
            ));
        }
        if self.header_bytes() > u64::from(u32::MAX) {
            return Err(Error::invalid_header(
                "header_size",
                self.header_size.into(),
                "header_size * cluster_size does not fit in 32 bits",
            ));
        }
        if self.image_size % SECTOR_SIZE != 0 {
            return Err(Error::invalid_header(
                "image_size",
                self.image_size,
                "must be a multiple of 512",
            ));
        }
        if self.image_size > geometry.max_image_size() {
            return Err(Error::invalid_header(
                "image_size",
                self.image_size,
                format!(
                    "exceeds the maximum of {} bytes for this cluster and table size",
                    geometry.max_image_size()
                ),
            ));
        }
        let file_clusters_end = geometry.cluster_start(file_len);
        if !table_offset_is_valid(self, &geometry, file_clusters_end, self.l1_table_offset) {
            return Err(Error::invalid_header(
                "l1_table_offset",
                self.l1_table_offset,
                format!(
                    "must be cluster aligned, past the header area, and the whole table \
                     inside the file ({file_len} bytes)"
                ),
            ));
        }
        if self.has_backing_file() {
            let end =
                u64::from(self.backing_filename_offset) + u64::from(self.backing_filename_size);
            if end > self.header_bytes() {
                return Err(Error::invalid_header(
                    "backing_filename_offset",
                    self.backing_filename_offset.into(),
                    format!(
                        "name of {} bytes ends at {end}, past the header area of {} bytes",
                        self.backing_filename_size,
                        self.header_bytes()
                    ),
                ));
            }
            if self.backing_filename_size == 0 || self.backing_filename_size > MAX_BACKING_NAME_LEN
            {
                return Err(Error::invalid_header(
                    "backing_filename_size",
                    self.backing_filename_size.into(),
                    format!("must be from 1 to {MAX_BACKING_NAME_LEN} bytes"),
                ));
            }
        }
        Ok(geometry)
    }
}

/// Whether `offset` may hold a data cluster: cluster aligned, past the header area and
/// below `file_clusters_end` (the file length rounded down to a cluster).
pub fn cluster_offset_is_valid(
    header: &Header,
    geometry: &Geometry,
    file_clusters_end: u64,
    offset: u64,
) -> bool {
    geometry.is_cluster_aligned(offset)
        && offset >= header.header_bytes()
        && offset < file_clusters_end
}

/// Whether a whole table (`table_size` clusters) fits at `offset`.
pub fn table_offset_is_valid(
    header: &Header,
    geometry: &Geometry,
    file_clusters_end: u64,
    offset: u64,
) -> bool {
    // The last cluster of the table must be valid too. Unlike QEMU, a one-cluster table
    // (whose last cluster is its first) is accepted.
    match offset.checked_add(geometry.table_bytes() - geometry.cluster_size()) {
        Some(last) => {
            cluster_offset_is_valid(header, geometry, file_clusters_end, offset)
                && cluster_offset_is_valid(header, geometry, file_clusters_end, last)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let g = Geometry::new(65536, 4).unwrap();
        Header::new_for_create(g, 10 << 20, Some(8), true)
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut h = sample();
        h.compat_features = 0x1234_5678_9abc_def0;
        h.autoclear_features = 7;
        let b = h.encode();
        assert_eq!(&b[0..4], b"QED\0");
        assert_eq!(Header::decode(&b).unwrap(), h);
    }

    #[test]
    fn encoding_is_little_endian_at_documented_offsets() {
        let b = sample().encode();
        assert_eq!(&b[4..8], &[0, 0, 1, 0]);
        assert_eq!(&b[8..12], &[4, 0, 0, 0]);
        assert_eq!(&b[0x10..0x18], &[5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[0x28..0x30], &[0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&b[0x30..0x38], &[0, 0, 0xa0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[0x38..0x40], &[0x40, 0, 0, 0, 8, 0, 0, 0]);
    }

    #[test]
    fn bad_magic_is_named() {
        let mut b = sample().encode();
        b[0] = b'X';
        let e = Header::decode(&b).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }

    #[test]
    fn validation_accepts_fresh_image() {
        let h = sample();
        assert!(h.validate(5 * 65536).is_ok());
    }

    #[test]
    fn l1_must_fit_in_file() {
        let h = sample();
        let e = h.validate(4 * 65536 + 100).unwrap_err();
        assert!(e.to_string().contains("l1_table_offset"), "{e}");
    }

    #[test]
    fn one_cluster_tables_are_valid() {
        let g = Geometry::new(4096, 1).unwrap();
        let h = Header::new_for_create(g, 1 << 20, None, false);
        assert!(h.validate(2 * 4096).is_ok());
        assert!(h.validate(4096).is_err());
    }

    #[test]
    fn table_offset_overflow_is_invalid() {
        let h = sample();
        let g = Geometry::new(65536, 4).unwrap();
        assert!(!table_offset_is_valid(&h, &g, !0xffffu64, !0xffffu64));
    }
}
