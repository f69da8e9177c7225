//! qcow2's on-disk types, as far as converting between qcow2 and QED needs them: the
//! header with every field that can make an image unconvertible, and the table entries.
//! Big-endian throughout, as the qcow2 specification (QEMU's docs/interop/qcow2.rst)
//! defines them. No I/O.

/// `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// The fixed part of a version 2 header.
pub const V2_HEADER_LEN: usize = 72;
/// The header length version 3 images written here use: the 104 bytes of the version 3
/// fields, the compression type byte and padding to a multiple of 8, as QEMU writes it.
pub const V3_HEADER_LEN: usize = 112;
/// qcow2's smallest and largest cluster sizes (as log2).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qcow2 limits backing file names to 1023 bytes.
pub const MAX_BACKING_NAME: usize = 1023;
/// QEMU refuses L1 tables larger than 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Refcount order written here: 16-bit refcounts, QEMU's default.
pub const REFCOUNT_ORDER: u32 = 4;

/// Incompatible feature bits.
pub mod incompatible {
    /// The image was not closed cleanly and its refcounts may be wrong (lazy refcounts).
    pub const DIRTY: u64 = 1 << 0;
    /// The image was found corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    /// The compression type field is not zlib.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 16 bytes and carry subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
}

/// Auto-clear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Header extension types.
pub mod extension {
    /// The backing file's format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Persistent dirty bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// The encryption header (LUKS).
    pub const ENCRYPTION: u32 = 0x0537_be77;
    /// The external data file's name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Bits 9-55 of a table entry: a cluster-aligned host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Entry bit 63: the cluster's refcount is exactly one (L1 and standard L2 entries).
pub const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0 (version 3): the cluster reads as zeros.
pub const ZERO: u64 = 1;

/// A qcow2 header: the fields of versions 2 and 3 (version 2 with version 3's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// File offset of the backing file name; 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// File offset of the L1 table.
    pub l1_table_offset: u64,
    /// File offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// File offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits ([`incompatible`]).
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Auto-clear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Bytes of the header before its extensions.
    pub header_length: u32,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

impl Qcow2Header {
    /// Decodes a header from the start of the first cluster. `None` when `b` is too short
    /// for the header it announces or the magic is wrong; the fields' values are the
    /// caller's to judge.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < V2_HEADER_LEN || b[..4] != MAGIC {
            return None;
        }
        let version = be32(b, 4);
        let mut h = Qcow2Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
        };
        if version >= 3 {
            if b.len() < 104 {
                return None;
            }
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length > 104 && b.len() > 104 {
                h.compression_type = b[104];
            }
        }
        Some(h)
    }

    /// Encodes a version 3 header (its first [`V3_HEADER_LEN`] bytes).
    pub fn encode_v3(&self) -> [u8; V3_HEADER_LEN] {
        let mut b = [0u8; V3_HEADER_LEN];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0, &MAGIC);
        put(4, &3u32.to_be_bytes());
        put(8, &self.backing_file_offset.to_be_bytes());
        put(16, &self.backing_file_size.to_be_bytes());
        put(20, &self.cluster_bits.to_be_bytes());
        put(24, &self.size.to_be_bytes());
        put(32, &self.crypt_method.to_be_bytes());
        put(36, &self.l1_size.to_be_bytes());
        put(40, &self.l1_table_offset.to_be_bytes());
        put(48, &self.refcount_table_offset.to_be_bytes());
        put(56, &self.refcount_table_clusters.to_be_bytes());
        put(60, &self.nb_snapshots.to_be_bytes());
        put(64, &self.snapshots_offset.to_be_bytes());
        put(72, &self.incompatible_features.to_be_bytes());
        put(80, &self.compatible_features.to_be_bytes());
        put(88, &self.autoclear_features.to_be_bytes());
        put(96, &self.refcount_order.to_be_bytes());
        put(100, &(V3_HEADER_LEN as u32).to_be_bytes());
        b[104] = self.compression_type;
        b
    }

    /// The cluster size in bytes (for a `cluster_bits` already checked to be in range).
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }
}

/// One header extension: its type and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// The extension's type ([`extension`]).
    pub kind: u32,
    /// Its data, without padding.
    pub data: Vec<u8>,
}

/// Reads the header extensions in `cluster` (the first cluster) from `start` (the header
/// length) to `end` (the backing name's offset, or the cluster's end): type, length,
/// data padded to 8, until a type of 0. `Err` names the extension that runs past `end`.
pub fn read_extensions(cluster: &[u8], start: usize, end: usize) -> Result<Vec<Extension>, String> {
    let end = end.min(cluster.len());
    let mut out = Vec::new();
    let mut at = start;
    while at + 8 <= end {
        let (kind, len) = (be32(cluster, at), be32(cluster, at + 4) as usize);
        if kind == 0 {
            return Ok(out);
        }
        let data = at + 8;
        if len > end - data {
            return Err(format!(
                "header extension {kind:#x} at {at} runs past the end of the header area"
            ));
        }
        out.push(Extension {
            kind,
            data: cluster[data..data + len].to_vec(),
        });
        at = data + len.next_multiple_of(8);
    }
    Ok(out)
}

/// Encodes header extensions followed by the end marker.
pub fn encode_extensions(exts: &[Extension]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in exts {
        out.extend_from_slice(&e.kind.to_be_bytes());
        out.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.data);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&[0u8; 8]);
    out
}

/// Where a compressed cluster's bytes lie: `len` bytes from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedRun {
    /// File offset of the first compressed byte.
    pub offset: u64,
    /// Bytes to read: up to the end of the last 512-byte sector the descriptor names.
    pub len: u64,
}

/// Decodes a compressed L2 entry of an image with `cluster_bits`.
pub fn compressed_run(entry: u64, cluster_bits: u32) -> CompressedRun {
    // The split between offset and sector count moves with the cluster size.
    let x = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << x) - 1);
    let sectors = ((entry & !COMPRESSED & !COPIED) >> x) + 1;
    let end = (offset & !511) + sectors * 512;
    CompressedRun {
        offset,
        len: end - offset,
    }
}

/// The shape of a qcow2 image: its cluster size and virtual size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes, a multiple of 512.
    pub size: u64,
}

impl Qcow2Geometry {
    /// Bytes in a cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries in one L2 table (one cluster of 8-byte entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// Entries in the L1 table: enough for the whole virtual size.
    pub fn l1_entries(&self) -> u64 {
        self.size.div_ceil(self.l2_span())
    }

    /// Clusters the L1 table takes (none for an empty image, as QEMU makes it).
    pub fn l1_clusters(&self) -> u64 {
        (self.l1_entries() * 8).div_ceil(self.cluster_size())
    }

    /// Refcounts in one refcount block (16 bits each).
    pub fn refcounts_per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> REFCOUNT_ORDER
    }

    /// How many refcount blocks and refcount table clusters cover a file of `used`
    /// clusters followed by those blocks and that table: the smallest counts that cover
    /// themselves too.
    pub fn refcount_clusters(&self, used: u64) -> (u64, u64) {
        let per_block = self.refcounts_per_block();
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = used + blocks + table;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(self.cluster_size()).max(1);
            if b == blocks && t == table {
                return (blocks, table);
            }
            (blocks, table) = (b, t);
        }
    }
}

/// Encodes a refcount block covering clusters from `first`, each counted once when
/// `in_use` says so (every cluster at or past `end` is free).
pub fn refcount_block(
    g: &Qcow2Geometry,
    first: u64,
    end: u64,
    in_use: impl Fn(u64) -> bool,
    out: &mut [u8],
) {
    for (i, e) in out.chunks_exact_mut(2).enumerate() {
        let c = first + i as u64;
        let n: u16 = u16::from(c < end && in_use(c));
        e.copy_from_slice(&n.to_be_bytes());
    }
    debug_assert_eq!(out.len() as u64, g.cluster_size());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_encode() {
        let h = Qcow2Header {
            version: 3,
            backing_file_offset: 1024,
            backing_file_size: 8,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN as u32,
            compression_type: 0,
        };
        assert_eq!(Qcow2Header::decode(&h.encode_v3()), Some(h));
        assert_eq!(Qcow2Header::decode(b"QFI"), None);
    }

    #[test]
    fn extensions_round_trip_and_refuse_overruns() {
        let exts = vec![Extension {
            kind: extension::BACKING_FORMAT,
            data: b"qcow2".to_vec(),
        }];
        let mut cluster = vec![0u8; 200];
        let enc = encode_extensions(&exts);
        cluster[112..112 + enc.len()].copy_from_slice(&enc);
        assert_eq!(read_extensions(&cluster, 112, 200), Ok(exts));
        cluster[116..120].copy_from_slice(&1000u32.to_be_bytes());
        assert!(read_extensions(&cluster, 112, 200).is_err());
    }

    #[test]
    fn compressed_descriptor_splits_at_the_cluster_size() {
        // 64 KiB clusters: 54 offset bits, then the additional sector count.
        let entry = COMPRESSED | (2u64 << 54) | 0x1_0200;
        let run = compressed_run(entry, 16);
        assert_eq!(run.offset, 0x1_0200);
        assert_eq!(run.len, 3 * 512);
    }
}
