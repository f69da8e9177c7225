//! A QED image as the source of a conversion: its header checked, its tables read in
//! runs.

use super::entries::{BackingName, Entry, GuestTables, SourceFacts};
use crate::error::{Error, IoContext, Result};
use crate::format::header::{cluster_offset_is_valid, table_offset_is_valid, HEADER_LEN};
use crate::format::pin::MAX_PIN_LEN;
use crate::format::{Geometry, Header};
use crate::storage::Storage;

/// An opened QED source.
pub(super) struct QedSource<'a> {
    storage: &'a dyn Storage,
    facts: SourceFacts,
    header: Header,
    geometry: Geometry,
    l1: Vec<u64>,
    /// The file length rounded down to a cluster: valid offsets lie below it.
    clusters_end: u64,
}

impl<'a> QedSource<'a> {
    /// Reads and checks the header and the L1 table. An image that may be inconsistent
    /// (NEED_CHECK) is refused: its tables are to be repaired first.
    pub fn open(storage: &'a dyn Storage, name: &str) -> Result<Self> {
        let file_len = storage
            .len()
            .context(|| format!("reading the length of {name}"))?;
        let mut raw = [0u8; HEADER_LEN];
        storage
            .read_at(&mut raw, 0)
            .context(|| format!("reading the header of {name}"))?;
        let header = Header::decode(&raw).map_err(|e| e.in_file(name))?;
        let geometry = header.validate(file_len).map_err(|e| e.in_file(name))?;
        if header.needs_check() {
            return Err(Error::invalid_argument(format!(
                "{name}: the image may be inconsistent (NEED_CHECK is set: it was not closed \
                 cleanly); repair it first: qed check -r all {name} (or qemu-img check -r all \
                 {name})"
            )));
        }
        let backing = read_backing(storage, &header, name)?;
        // The name, then a base pin record where one may follow it.
        let header_used = match &backing {
            Some(_) => {
                let end = u64::from(header.backing_filename_offset)
                    + u64::from(header.backing_filename_size);
                end.next_multiple_of(8) + MAX_PIN_LEN as u64
            }
            None => HEADER_LEN as u64,
        };
        let mut l1_bytes = vec![0u8; geometry.table_bytes() as usize];
        storage
            .read_at(&mut l1_bytes, header.l1_table_offset)
            .context(|| format!("reading the L1 table of {name}"))?;
        let l1 = l1_bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        Ok(Self {
            storage,
            facts: SourceFacts {
                name: name.to_string(),
                cluster_size: geometry.cluster_size(),
                virtual_size: header.image_size,
                file_len,
                backing,
                header_used,
                zstd: false,
            },
            clusters_end: geometry.cluster_start(file_len),
            header,
            geometry,
            l1,
        })
    }

    fn corrupt(&self, what: String) -> Error {
        Error::invalid_argument(format!(
            "{}: {what}; the image is corrupt: repair it first (qed check -r all)",
            self.facts.name
        ))
    }

    /// The L2 table of L1 entry `i`, checked; 0 for none.
    fn l2_offset(&self, i: u64) -> Result<u64> {
        let off = self.l1.get(i as usize).copied().unwrap_or(0);
        if off != 0 && !table_offset_is_valid(&self.header, &self.geometry, self.clusters_end, off)
        {
            return Err(self.corrupt(format!("L1 entry {i} points at {off}")));
        }
        Ok(off)
    }
}

impl GuestTables for QedSource<'_> {
    fn facts(&self) -> &SourceFacts {
        &self.facts
    }

    fn read_run(&self, first: u64, out: &mut [Entry]) -> Result<bool> {
        let per_table = self.geometry.entries_per_table();
        let mut any = false;
        let mut done = 0;
        while done < out.len() {
            let c = first + done as u64;
            let (table, index) = (c / per_table, c % per_table);
            let n = ((per_table - index) as usize).min(out.len() - done);
            let part = &mut out[done..done + n];
            done += n;
            let l2 = self.l2_offset(table)?;
            if l2 == 0 {
                part.fill(Entry::Unallocated);
                continue;
            }
            let mut bytes = vec![0u8; n * 8];
            self.storage
                .read_at(&mut bytes, l2 + index * 8)
                .context(|| format!("reading the L2 table at {l2} of {}", self.facts.name))?;
            for (i, e) in part.iter_mut().enumerate() {
                let raw = u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
                *e = match raw {
                    0 => Entry::Unallocated,
                    1 => Entry::Zero,
                    off if cluster_offset_is_valid(
                        &self.header,
                        &self.geometry,
                        self.clusters_end,
                        off,
                    ) =>
                    {
                        Entry::Data(off)
                    }
                    off => {
                        return Err(self.corrupt(format!(
                            "the L2 table at {l2} maps guest offset {} to {off}",
                            (c + i as u64) * self.facts.cluster_size
                        )))
                    }
                };
            }
            any = true;
        }
        Ok(any)
    }

    fn old_metadata(&self) -> Vec<(u64, u64)> {
        let tb = self.geometry.table_bytes();
        let mut ranges = vec![(self.header.l1_table_offset, tb)];
        ranges.extend(self.l1.iter().filter(|&&o| o != 0).map(|&o| (o, tb)));
        ranges
    }
}

/// The backing file name and, for a raw one, its format.
fn read_backing(storage: &dyn Storage, h: &Header, name: &str) -> Result<Option<BackingName>> {
    if !h.has_backing_file() {
        return Ok(None);
    }
    let mut buf = vec![0u8; h.backing_filename_size as usize];
    storage
        .read_at(&mut buf, u64::from(h.backing_filename_offset))
        .context(|| format!("reading the backing file name of {name}"))?;
    Ok(Some(BackingName {
        name: String::from_utf8_lossy(&buf).into_owned(),
        format: h.backing_is_raw().then(|| "raw".to_string()),
    }))
}
