//! What a qcow2 image's header says about it, read without opening the image: the facts
//! `qemu-img info` reports of a qcow2 layer in a backing chain.

use crate::error::{Error, IoContext, Result};
use crate::storage::Storage;

use crate::format::qcow2::V2_HEADER_LEN;
use crate::format::qcow2::{
    extension, MAGIC, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS,
};

/// Header extension holding the backing file's format.
const EXT_BACKING_FORMAT: u32 = extension::BACKING_FORMAT;

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
        let len = storage
            .len()
            .context(|| format!("reading the length of {name}"))?;
        let first = (1u64 << MAX_CLUSTER_BITS).min(len) as usize;
        let mut buf = vec![0u8; first.max(V2_HEADER_LEN)];
        storage
            .read_at(&mut buf, 0)
            .context(|| format!("reading the qcow2 header of {name}"))?;
        let h = FirstCluster { buf: &buf, name };
        if buf[..4] != MAGIC {
            return Err(h.invalid("not a qcow2 image (no qcow2 magic)".into()));
        }
        let version = h.be32(4);
        if version != 2 && version != 3 {
            return Err(h.invalid(format!("unsupported qcow2 version {version}")));
        }
        let cluster_bits = h.be32(20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(h.invalid(format!(
                "invalid qcow2 cluster_bits {cluster_bits}: it must be from 9 to 21"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        // Everything below lies in the first cluster.
        let h = FirstCluster {
            buf: &buf[..(cluster_size as usize).min(buf.len())],
            name,
        };
        let features = Features::read(&h, version)?;
        Ok(Self {
            version,
            size: h.be64(24),
            cluster_size,
            backing_file: h.backing_file()?,
            backing_format: h.backing_format(features.header_len)?,
            dirty: features.incompatible & 1 != 0,
            corrupt: features.incompatible & 2 != 0,
            extended_l2: features.incompatible & 16 != 0,
            lazy_refcounts: features.compatible & 1 != 0,
            refcount_bits: 1 << features.refcount_order,
            compression_type: features.compression_type,
        })
    }
}

/// The bytes of a qcow2 image's header, at most its first cluster (and at least a
/// version 2 header), and the image's name for errors.
struct FirstCluster<'a> {
    buf: &'a [u8],
    name: &'a str,
}

impl FirstCluster<'_> {
    fn be32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.buf[at..at + 4].try_into().unwrap_or([0; 4]))
    }

    fn be64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.buf[at..at + 8].try_into().unwrap_or([0; 8]))
    }

    fn invalid(&self, why: String) -> Error {
        Error::invalid_argument(format!("{}: {why}", self.name))
    }

    /// The backing file name, which must lie in the first cluster.
    fn backing_file(&self) -> Result<Option<String>> {
        let (offset, size) = (self.be64(8), self.be32(16) as usize);
        if offset == 0 {
            return Ok(None);
        }
        let end = offset.checked_add(size as u64);
        if size > MAX_BACKING_NAME || end.is_none_or(|e| e > self.buf.len() as u64) {
            return Err(self.invalid(format!(
                "invalid qcow2 backing file name: {size} bytes at {offset}"
            )));
        }
        let at = offset as usize;
        Ok(Some(
            String::from_utf8_lossy(&self.buf[at..at + size]).into_owned(),
        ))
    }

    /// The backing format from the header extensions after `header_len`: type, length,
    /// data padded to 8 bytes, until a type of 0.
    fn backing_format(&self, header_len: usize) -> Result<Option<String>> {
        let in_header = self.buf.len();
        let mut backing_format = None;
        let mut at = header_len;
        while at + 8 <= in_header {
            let (kind, n) = (self.be32(at), self.be32(at + 4) as usize);
            if kind == 0 {
                break;
            }
            let data = at + 8;
            if n > in_header - data {
                return Err(self.invalid(format!(
                    "qcow2 header extension {kind:#x} at {at} runs past the first cluster"
                )));
            }
            if kind == EXT_BACKING_FORMAT {
                backing_format =
                    Some(String::from_utf8_lossy(&self.buf[data..data + n]).into_owned());
            }
            at = data + n.next_multiple_of(8);
        }
        Ok(backing_format)
    }
}

/// The feature fields, which version 3 headers add (version 2 has their defaults).
struct Features {
    header_len: usize,
    incompatible: u64,
    compatible: u64,
    refcount_order: u32,
    compression_type: &'static str,
}

impl Features {
    fn read(h: &FirstCluster<'_>, version: u32) -> Result<Self> {
        let mut f = Features {
            header_len: V2_HEADER_LEN,
            incompatible: 0,
            compatible: 0,
            refcount_order: 4,
            compression_type: "zlib",
        };
        if version == 3 {
            let in_header = h.buf.len();
            if in_header < 104 {
                return Err(h.invalid("the qcow2 v3 header is cut short".into()));
            }
            f.incompatible = h.be64(72);
            f.compatible = h.be64(80);
            f.refcount_order = h.be32(96);
            f.header_len = h.be32(100) as usize;
            if f.header_len < 104 || f.header_len > in_header {
                return Err(h.invalid(format!("invalid qcow2 header_length {}", f.header_len)));
            }
            if f.header_len > 104 && h.buf[104] == 1 {
                f.compression_type = "zstd";
            }
        }
        if f.refcount_order > 6 {
            return Err(h.invalid(format!("invalid qcow2 refcount_order {}", f.refcount_order)));
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    /// A v3 header with 64 KiB clusters, a backing name and its format extension.
    fn v3() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[8..16].copy_from_slice(&200u64.to_be_bytes());
        b[16..20].copy_from_slice(&8u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[80..88].copy_from_slice(&1u64.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&5u32.to_be_bytes());
        b[120..125].copy_from_slice(b"qcow2");
        b[200..208].copy_from_slice(b"base.img");
        b
    }

    fn read(bytes: Vec<u8>) -> Result<Qcow2Facts> {
        Qcow2Facts::read(&MemoryStorage::from_bytes(bytes), "test.qcow2")
    }

    #[test]
    fn reads_what_the_header_says() {
        let f = read(v3()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.cluster_size, 65536);
        assert_eq!(f.size, 1 << 30);
        assert_eq!(f.backing_file.as_deref(), Some("base.img"));
        assert_eq!(f.backing_format.as_deref(), Some("qcow2"));
        assert!(f.lazy_refcounts && !f.dirty && !f.corrupt);
        assert_eq!(f.refcount_bits, 16);
        assert_eq!(f.compression_type, "zlib");
    }

    #[test]
    fn bad_fields_are_errors_not_panics() {
        let cases: [(usize, &[u8]); 6] = [
            // backing name past the first cluster
            (8, &(65530u64).to_be_bytes()),
            // cluster_bits out of range
            (20, &40u32.to_be_bytes()),
            // header_length past the first cluster
            (100, &0x00ff_ffffu32.to_be_bytes()),
            // an extension longer than the cluster
            (116, &u32::MAX.to_be_bytes()),
            // refcount_order too large
            (96, &9u32.to_be_bytes()),
            // version 4
            (4, &4u32.to_be_bytes()),
        ];
        for (at, bytes) in cases {
            let mut b = v3();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            let e = read(b).unwrap_err().to_string();
            assert!(e.contains("test.qcow2"), "{e}");
        }
        // Every cut of the header either reads or fails cleanly.
        let full = v3();
        for len in [0, 3, 4, 50, 72, 100, 104, 120, 204, 4096] {
            let _ = read(full[..len].to_vec());
        }
        assert!(read(b"QFI".to_vec()).is_err());
    }
}
