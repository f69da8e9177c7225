//! A qcow2 image as the source of a conversion: its header judged for what QED can
//! express, its tables read in runs.

use super::entries::{BackingName, Entry, GuestTables, SourceFacts};
use crate::error::{Error, IoContext, Result};
use crate::format::qcow2::{self, extension, incompatible, Qcow2Header};
use crate::storage::Storage;

/// QED's smallest cluster.
const MIN_QED_CLUSTER_BITS: u32 = 12;

/// An opened qcow2 source.
pub(super) struct Qcow2Source<'a> {
    storage: &'a dyn Storage,
    facts: SourceFacts,
    header: Qcow2Header,
    l1: Vec<u64>,
}

impl<'a> Qcow2Source<'a> {
    /// Reads and judges the header and the L1 table. Refuses, naming the feature and
    /// the way out, whatever QED cannot express.
    pub fn open(storage: &'a dyn Storage, name: &str) -> Result<Self> {
        let file_len = storage
            .len()
            .context(|| format!("reading the length of {name}"))?;
        let invalid = |why: String| Error::invalid_argument(format!("{name}: {why}"));
        let mut first = vec![0u8; (1usize << qcow2::MAX_CLUSTER_BITS).min(file_len as usize)];
        storage
            .read_at(&mut first, 0)
            .context(|| format!("reading the qcow2 header of {name}"))?;
        let header = Qcow2Header::decode(&first)
            .ok_or_else(|| invalid("not a qcow2 image, or its header is cut short".into()))?;
        judge_header(&header, &invalid)?;
        let cs = header.cluster_size();
        let first = &first[..(cs as usize).min(first.len())];
        let (backing, exts_end) = backing_and_extensions(&header, first, &invalid)?;
        let zstd = header.compression_type == 1;
        let l1 = read_l1(storage, &header, file_len, name)?;
        Ok(Self {
            storage,
            facts: SourceFacts {
                name: name.to_string(),
                cluster_size: cs,
                virtual_size: header.size,
                file_len,
                backing,
                header_used: exts_end,
                zstd,
            },
            header,
            l1,
        })
    }

    fn corrupt(&self, what: String) -> Error {
        Error::invalid_argument(format!(
            "{}: {what}; the image is corrupt: check it (qemu-img check -r all)",
            self.facts.name
        ))
    }

    /// Decodes one L2 entry of guest cluster `c`.
    fn entry(&self, raw: u64, c: u64) -> Result<Entry> {
        let cs = self.facts.cluster_size;
        if raw & qcow2::COMPRESSED != 0 {
            let run = qcow2::compressed_run(raw, self.header.cluster_bits);
            if run.offset < cs || run.offset >= self.facts.file_len {
                return Err(self.corrupt(format!(
                    "the compressed cluster of guest offset {} lies at {}, outside the file",
                    c * cs,
                    run.offset
                )));
            }
            return Ok(Entry::Compressed(run));
        }
        let offset = raw & qcow2::OFFSET_MASK;
        if raw & qcow2::ZERO != 0 {
            if self.header.version < 3 {
                return Err(self.corrupt(format!(
                    "guest offset {} has the zero flag, which version 2 images lack",
                    c * cs
                )));
            }
            return Ok(Entry::Zero);
        }
        if offset == 0 {
            return Ok(Entry::Unallocated);
        }
        if offset % cs != 0 || offset >= self.facts.file_len {
            return Err(self.corrupt(format!(
                "the cluster of guest offset {} is at {offset}: unaligned or past the end",
                c * cs
            )));
        }
        Ok(Entry::Data(offset))
    }
}

impl GuestTables for Qcow2Source<'_> {
    fn facts(&self) -> &SourceFacts {
        &self.facts
    }

    fn read_run(&self, first: u64, out: &mut [Entry]) -> Result<bool> {
        let cs = self.facts.cluster_size;
        let per_table = cs / 8;
        let mut any = false;
        let mut table = vec![0u8; cs as usize];
        for (t, chunk) in out.chunks_mut(per_table as usize).enumerate() {
            let first_c = first + t as u64 * per_table;
            let l1_index = first_c / per_table;
            let l2 = self.l1.get(l1_index as usize).copied().unwrap_or(0) & qcow2::OFFSET_MASK;
            if l2 == 0 {
                chunk.fill(Entry::Unallocated);
                continue;
            }
            if l2 % cs != 0 || l2 + cs > self.facts.file_len.next_multiple_of(cs) {
                return Err(self.corrupt(format!("L1 entry {l1_index} points at {l2}")));
            }
            self.storage
                .read_at(&mut table, l2)
                .context(|| format!("reading an L2 table at {l2} of {}", self.facts.name))?;
            for (i, e) in chunk.iter_mut().enumerate() {
                let raw = u64::from_be_bytes(table[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
                *e = self.entry(raw, first_c + i as u64)?;
            }
            any = true;
        }
        Ok(any)
    }

    fn old_metadata(&self) -> Vec<(u64, u64)> {
        // After the switch the old tables are leaks that compaction reclaims; nothing to
        // punch by hand.
        Vec::new()
    }
}

/// Refuses what QED cannot express, and images that are not to be trusted.
fn judge_header(h: &Qcow2Header, invalid: &dyn Fn(String) -> Error) -> Result<()> {
    if h.version != 2 && h.version != 3 {
        return Err(invalid(format!("unsupported qcow2 version {}", h.version)));
    }
    if !(qcow2::MIN_CLUSTER_BITS..=qcow2::MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
        return Err(invalid(format!(
            "invalid qcow2 cluster_bits {}",
            h.cluster_bits
        )));
    }
    if h.cluster_bits < MIN_QED_CLUSTER_BITS {
        return Err(invalid(format!(
            "its cluster size is {} bytes and QED's smallest is 4 KiB, so its clusters cannot \
             stay where they are; copy it instead (qed convert -O qed SRC DST)",
            h.cluster_size()
        )));
    }
    if h.crypt_method != 0 {
        return Err(invalid(
            "it is encrypted, which QED cannot express; decrypt it by copying \
             (qemu-img convert --object secret,... --image-opts ... -O qcow2 DST)"
                .into(),
        ));
    }
    if h.nb_snapshots != 0 {
        return Err(invalid(format!(
            "it has {} internal snapshot(s), which QED cannot express; list them with \
             qemu-img snapshot -l FILE and delete each with qemu-img snapshot -d NAME FILE",
            h.nb_snapshots
        )));
    }
    let incompat = h.incompatible_features;
    if incompat & incompatible::DIRTY != 0 {
        return Err(invalid(
            "it was not closed cleanly (the dirty bit is set, so its refcounts may be \
             wrong); repair it first: qemu-img check -r all FILE"
                .into(),
        ));
    }
    if incompat & incompatible::CORRUPT != 0 {
        return Err(invalid(
            "it is marked corrupt; repair it first: qemu-img check -r all FILE".into(),
        ));
    }
    if incompat & incompatible::EXTERNAL_DATA_FILE != 0 {
        return Err(invalid(
            "its guest data is in an external data file, which QED cannot express; copy it \
             into one file (qemu-img convert -O qcow2 SRC DST)"
                .into(),
        ));
    }
    if incompat & incompatible::EXTENDED_L2 != 0 {
        return Err(invalid(
            "it has extended L2 entries (subclusters), which QED cannot express; rewrite it \
             without them (qemu-img convert -O qcow2 -o extended_l2=off SRC DST)"
                .into(),
        ));
    }
    let unknown = incompat
        & !(incompatible::DIRTY
            | incompatible::CORRUPT
            | incompatible::EXTERNAL_DATA_FILE
            | incompatible::COMPRESSION_TYPE
            | incompatible::EXTENDED_L2);
    if unknown != 0 {
        return Err(invalid(format!(
            "unknown incompatible qcow2 features {unknown:#x}"
        )));
    }
    if h.autoclear_features & qcow2::AUTOCLEAR_BITMAPS != 0 {
        return Err(bitmaps(invalid));
    }
    if h.size % 512 != 0 {
        return Err(invalid(format!(
            "its virtual size {} is not a multiple of 512, which QED requires",
            h.size
        )));
    }
    Ok(())
}

fn bitmaps(invalid: &dyn Fn(String) -> Error) -> Error {
    invalid(
        "it has persistent dirty bitmaps, which QED cannot express; list them with \
         qemu-img info FILE and remove each with qemu-img bitmap --remove FILE NAME"
            .into(),
    )
}

/// The backing file and its format, and the bytes of the first cluster the header,
/// its extensions and the backing name take. Refuses extensions QED cannot express.
fn backing_and_extensions(
    h: &Qcow2Header,
    first: &[u8],
    invalid: &dyn Fn(String) -> Error,
) -> Result<(Option<BackingName>, u64)> {
    let cs = first.len();
    let header_len = h.header_length as usize;
    if header_len < qcow2::V2_HEADER_LEN || header_len > cs {
        return Err(invalid(format!("invalid qcow2 header_length {header_len}")));
    }
    let (name_at, name_len) = (h.backing_file_offset, h.backing_file_size as usize);
    let exts_end = if name_at != 0 { name_at as usize } else { cs };
    let exts = qcow2::read_extensions(first, header_len, exts_end).map_err(invalid)?;
    let mut used = header_len + 8;
    let mut format = None;
    for e in &exts {
        used += 8 + e.data.len().next_multiple_of(8);
        match e.kind {
            extension::BACKING_FORMAT => {
                format = Some(String::from_utf8_lossy(&e.data).into_owned());
            }
            extension::BITMAPS => return Err(bitmaps(invalid)),
            extension::ENCRYPTION => {
                return Err(invalid(
                    "it has an encryption header, which QED cannot express".into(),
                ))
            }
            extension::DATA_FILE => {
                return Err(invalid(
                    "it names an external data file, which QED cannot express; copy it into \
                     one file (qemu-img convert -O qcow2 SRC DST)"
                        .into(),
                ))
            }
            _ => {}
        }
    }
    if name_at == 0 {
        return Ok((None, used as u64));
    }
    let end = name_at.checked_add(name_len as u64);
    if name_len == 0 || name_len > qcow2::MAX_BACKING_NAME || end.is_none_or(|e| e > cs as u64) {
        return Err(invalid(format!(
            "invalid qcow2 backing file name: {name_len} bytes at {name_at}"
        )));
    }
    let name = String::from_utf8_lossy(&first[name_at as usize..name_at as usize + name_len]);
    let used = used.max(name_at as usize + name_len);
    Ok((
        Some(BackingName {
            name: name.into_owned(),
            format,
        }),
        used as u64,
    ))
}

/// Reads the L1 table, refusing one that lies outside the file or is too small for
/// the virtual size.
fn read_l1(storage: &dyn Storage, h: &Qcow2Header, file_len: u64, name: &str) -> Result<Vec<u64>> {
    let cs = h.cluster_size();
    let reach = cs * (cs / 8);
    let needed = h.size.div_ceil(reach);
    let bytes = u64::from(h.l1_size) * 8;
    let bad = |why: &str| {
        Error::invalid_argument(format!(
            "{name}: the L1 table ({} entries at {}) {why}; check the image (qemu-img check)",
            h.l1_size, h.l1_table_offset
        ))
    };
    if u64::from(h.l1_size) < needed {
        return Err(bad("is too small for the virtual size"));
    }
    if bytes > qcow2::MAX_L1_BYTES {
        return Err(bad("is larger than qcow2 allows"));
    }
    if h.l1_size == 0 {
        return Ok(Vec::new());
    }
    if h.l1_table_offset % cs != 0 || h.l1_table_offset.saturating_add(bytes) > file_len {
        return Err(bad("lies outside the file or is unaligned"));
    }
    let mut buf = vec![0u8; bytes as usize];
    storage
        .read_at(&mut buf, h.l1_table_offset)
        .context(|| format!("reading the L1 table of {name}"))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}
