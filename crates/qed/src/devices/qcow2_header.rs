//! What a qcow2 image's header says about it, read without opening the image: the facts
//! `qemu-img info` reports of a qcow2 layer in a backing chain.

use crate::error::{Error, IoContext, Result};
use crate::storage::Storage;

const MAGIC: [u8; 4] = *b"QFI\xfb";
/// The fixed part of a version 2 header; version 3 headers say their own length.
const V2_HEADER_LEN: usize = 72;
/// Header extension holding the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// qcow2 limits its clusters to 2 MiB, so the first cluster (which holds the header, its
/// extensions and the backing file name) is read whole within that bound.
const MAX_CLUSTER_BITS: u32 = 21;
const MIN_CLUSTER_BITS: u32 = 9;
/// qcow2 limits backing file names to 1023 bytes.
const MAX_BACKING_NAME: usize = 1023;

/// Header facts of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Facts {
    /// 2 or 3.
    pub version: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// The backing file name, as stored.
    pub backing_file: Option<String>,
    /// The backing file's format, when the header records it.
    pub backing_format: Option<String>,
    /// Incompatible feature bit 0: the image was not closed cleanly (lazy refcounts).
    pub dirty: bool,
    /// Incompatible feature bit 1: the image is marked corrupt.
    pub corrupt: bool,
    /// Incompatible feature bit 4: subclusters.
    pub extended_l2: bool,
    /// Compatible feature bit 0.
    pub lazy_refcounts: bool,
    /// Bits per refcount entry.
    pub refcount_bits: u64,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
}

impl Qcow2Facts {
    /// Reads the header of the qcow2 image in `storage`; `name` names it in errors.
    pub fn read(storage: &dyn Storage, name: &str) -> Result<Self> {
        let invalid = |why: String| Error::invalid_argument(format!("{name}: {why}"));
        let len = storage
            .len()
            .context(|| format!("reading the length of {name}"))?;
        let first = (1u64 << MAX_CLUSTER_BITS).min(len) as usize;
        let mut buf = vec![0u8; first.max(V2_HEADER_LEN)];
        storage
            .read_at(&mut buf, 0)
            .context(|| format!("reading the qcow2 header of {name}"))?;
        if buf[..4] != MAGIC {
            return Err(invalid("not a qcow2 image (no qcow2 magic)".into()));
        }
        let be32 = |at: usize| u32::from_be_bytes(buf[at..at + 4].try_into().unwrap_or([0; 4]));
        let be64 = |at: usize| u64::from_be_bytes(buf[at..at + 8].try_into().unwrap_or([0; 8]));
        let version = be32(4);
        if version != 2 && version != 3 {
            return Err(invalid(format!("unsupported qcow2 version {version}")));
        }
        let cluster_bits = be32(20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(format!(
                "invalid qcow2 cluster_bits {cluster_bits}: it must be from 9 to 21"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        // Everything below lies in the first cluster.
        let in_header = (cluster_size as usize).min(buf.len());
        let (mut header_len, mut incompatible, mut compatible, mut refcount_order) =
            (V2_HEADER_LEN, 0, 0, 4);
        let mut compression_type = "zlib";
        if version == 3 {
            if in_header < 104 {
                return Err(invalid("the qcow2 v3 header is cut short".into()));
            }
            incompatible = be64(72);
            compatible = be64(80);
            refcount_order = be32(96);
            header_len = be32(100) as usize;
            if header_len < 104 || header_len > in_header {
                return Err(invalid(format!("invalid qcow2 header_length {header_len}")));
            }
            if header_len > 104 && buf[104] == 1 {
                compression_type = "zstd";
            }
        }
        if refcount_order > 6 {
            return Err(invalid(format!(
                "invalid qcow2 refcount_order {refcount_order}"
            )));
        }
        let backing_file = {
            let (offset, size) = (be64(8), be32(16) as usize);
            if offset == 0 {
                None
            } else {
                let end = offset.checked_add(size as u64);
                if size > MAX_BACKING_NAME || end.is_none_or(|e| e > in_header as u64) {
                    return Err(invalid(format!(
                        "invalid qcow2 backing file name: {size} bytes at {offset}"
                    )));
                }
                let at = offset as usize;
                Some(String::from_utf8_lossy(&buf[at..at + size]).into_owned())
            }
        };
        // Extensions: type, length, data padded to 8 bytes, until a type of 0.
        let mut backing_format = None;
        let mut at = header_len;
        while at + 8 <= in_header {
            let (kind, n) = (be32(at), be32(at + 4) as usize);
            if kind == 0 {
                break;
            }
            let data = at + 8;
            if n > in_header - data {
                return Err(invalid(format!(
                    "qcow2 header extension {kind:#x} at {at} runs past the first cluster"
                )));
            }
            if kind == EXT_BACKING_FORMAT {
                backing_format = Some(String::from_utf8_lossy(&buf[data..data + n]).into_owned());
            }
            at = data + n.next_multiple_of(8);
        }
        Ok(Self {
            version,
            size: be64(24),
            cluster_size,
            backing_file,
            backing_format,
            dirty: incompatible & 1 != 0,
            corrupt: incompatible & 2 != 0,
            extended_l2: incompatible & 16 != 0,
            lazy_refcounts: compatible & 1 != 0,
            refcount_bits: 1 << refcount_order,
            compression_type,
        })
    }
}
