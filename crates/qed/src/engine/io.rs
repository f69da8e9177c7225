//! Moving guest bytes: reads, writes, zero writes, discards, flushes and block status.
//!
//! Write ordering for an allocating write (why each step is safe is in docs/design.md):
//! 1. without a backing file, set NEED_CHECK in the header and flush, once per session;
//! 2. append the data cluster(s) at the frontier (the file is grown first, so the rest
//!    of a partly written new cluster reads as zeros without writing them);
//! 3. with a backing file, flush, so no L2 entry can reach disk before its data;
//! 4. existing L2 table: rewrite the 512-byte sectors that changed; new L2 table: write
//!    its non-zero sectors, flush, then write the L1 entry's sector.

use super::l2cache::PAGE_ENTRIES;
use super::{AllocState, Image, Mapping, ENTRIES_PER_SECTOR};
use crate::device::{check_range, BlockDevice, BlockStatus, Format};
use crate::error::{Error, IoContext, Result};
use crate::format::table::encode_entries;
use crate::format::table::ZERO_CLUSTER;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

/// Largest buffer used to copy from the backing file.
const COPY_CHUNK: u64 = 1 << 20;

impl Image {
    fn writable(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size())
    }

    /// Reads guest bytes that this image does not hold: from the backing file, or zeros.
    fn read_unallocated(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let Some(backing) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let Some(dev) = &backing.device else {
            return Err(Error::Backing {
                path: backing.path.clone(),
                reason: "the image was opened without its backing file".into(),
            });
        };
        let avail = dev.size().saturating_sub(pos).min(buf.len() as u64) as usize;
        if avail > 0 {
            dev.read_at(&mut buf[..avail], pos)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// Size of the backing device, 0 without one.
    fn backing_size(&self) -> u64 {
        self.backing
            .as_ref()
            .and_then(|b| b.device.as_ref())
            .map_or(0, |d| d.size())
    }

    fn read_guest(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        check_range(pos, buf.len() as u64, self.size())?;
        let mut done = 0usize;
        while done < buf.len() {
            let p = pos + done as u64;
            let (mapping, n) = self.lookup(p, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + n as usize];
            match mapping {
                Mapping::Data(off) => self
                    .storage
                    .read_at(chunk, off)
                    .context(|| format!("reading {n} bytes at {off:#x} of {}", self.name))?,
                Mapping::Zero => chunk.fill(0),
                Mapping::Unallocated => self.read_unallocated(chunk, p)?,
            }
            done += n as usize;
        }
        Ok(())
    }

    fn write_guest(&self, buf: &[u8], pos: u64) -> Result<()> {
        self.writable(pos, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let p = pos + done as u64;
            let rest = &buf[done..];
            let (mapping, n) = self.lookup(p, rest.len() as u64)?;
            done += match mapping {
                Mapping::Data(off) => {
                    self.storage
                        .write_at(&rest[..n as usize], off)
                        .context(|| format!("writing {n} bytes at {off:#x} of {}", self.name))?;
                    n as usize
                }
                Mapping::Zero | Mapping::Unallocated => self.write_allocating(rest, p)?,
            };
        }
        Ok(())
    }

    /// Writes the start of `buf` at `pos` into newly allocated clusters. Returns how many
    /// bytes it wrote: 0 when another writer allocated the cluster first.
    fn write_allocating(&self, buf: &[u8], pos: u64) -> Result<usize> {
        let mut st = self.lock_alloc();
        let (mapping, n) = self.lookup(pos, buf.len() as u64)?;
        if let Mapping::Data(_) = mapping {
            return Ok(0);
        }
        self.prepare_allocation(&mut st)?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let first = g.cluster_start(pos);
        let end = (pos + n).next_multiple_of(cs);
        let nclusters = (end - first) / cs;
        let new_off = self.reserve(nclusters * cs)?;

        let head = pos - first;
        let tail = end - (pos + n);
        let from_backing = mapping == Mapping::Unallocated;
        if head > 0 && from_backing {
            self.copy_from_backing(first, head, new_off)?;
        }
        self.storage
            .write_at(&buf[..n as usize], new_off + head)
            .context(|| {
                format!(
                    "writing {n} bytes at {:#x} of {}",
                    new_off + head,
                    self.name
                )
            })?;
        if tail > 0 && from_backing {
            self.copy_from_backing(pos + n, tail, new_off + head + n)?;
        }
        if self.backing.is_some() {
            self.flush_storage()?;
        }
        self.set_l2_entries(&mut st, first, nclusters, |i| new_off + i * cs)?;
        Ok(n as usize)
    }

    /// Copies `len` guest bytes at `pos` from the backing file to file offset `to`.
    /// Bytes past the end of the backing file already read as zeros in a new cluster.
    fn copy_from_backing(&self, pos: u64, len: u64, to: u64) -> Result<()> {
        let len = len.min(self.backing_size().saturating_sub(pos));
        let mut buf = vec![0u8; len.min(COPY_CHUNK) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(COPY_CHUNK) as usize;
            self.read_unallocated(&mut buf[..n], pos + done)?;
            self.storage
                .write_at(&buf[..n], to + done)
                .context(|| format!("copying backing data into {}", self.name))?;
            done += n as u64;
        }
        Ok(())
    }

    /// Work done before the first allocation of a session.
    fn prepare_allocation(&self, st: &mut AllocState) -> Result<()> {
        if st.trailing_garbage {
            // A partial cluster past the frontier is unreferenced; drop it so that new
            // clusters there read as zeros.
            self.storage
                .set_len(self.file_clusters_end())
                .context(|| format!("truncating the partial last cluster of {}", self.name))?;
            st.trailing_garbage = false;
        }
        let mut header = self.header_read().clone();
        // With a backing file every L2 update is preceded by a flush of its data, so a
        // crash cannot leave an entry pointing at unwritten data: no check needed.
        if self.backing.is_none() && !header.needs_check() {
            header.features |= crate::format::features::NEED_CHECK;
            self.write_header(&header)?;
            self.flush_storage()?;
            *self.header.write().unwrap_or_else(|p| p.into_inner()) = header;
        }
        Ok(())
    }

    /// Appends `bytes` at the frontier, growing the file first. Returns where.
    pub(super) fn reserve(&self, bytes: u64) -> Result<u64> {
        let old = self.file_clusters_end();
        let new = old.checked_add(bytes).ok_or_else(|| {
            Error::Unsupported(format!("{}: the file would exceed 2^64 bytes", self.name))
        })?;
        self.storage
            .set_len(new)
            .context(|| format!("growing {} to {new} bytes", self.name))?;
        self.frontier.store(new, Ordering::Release);
        Ok(old)
    }

    pub(super) fn flush_storage(&self) -> Result<()> {
        self.storage
            .flush()
            .context(|| format!("flushing {}", self.name))
    }

    /// Sets the L2 entries of `n` clusters from guest offset `first` (all inside one page
    /// of entries) to `value(i)`, allocating the L2 table if there is none.
    fn set_l2_entries(
        &self,
        _st: &mut MutexGuard<'_, AllocState>,
        first: u64,
        n: u64,
        value: impl Fn(u64) -> u64,
    ) -> Result<()> {
        let g = self.geometry;
        let l1_index = g.l1_index(first);
        let l2_index = g.l2_index(first);
        let l2_offset = self.l1.read().unwrap_or_else(|p| p.into_inner())[l1_index as usize];
        let page_first = l2_index % PAGE_ENTRIES;
        let sec_start = page_first / ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR;
        let sec_end = (page_first + n).next_multiple_of(ENTRIES_PER_SECTOR);
        let page_base = (l2_index - page_first) * 8;

        let new_table = l2_offset == 0;
        let table = if new_table {
            self.reserve(g.table_bytes())?
        } else {
            self.check_l2_offset(l1_index, l2_offset)?;
            l2_offset
        };
        let (page, page_off) = self.l2.page(table, l2_index);
        let mut entries = vec![0u64; (sec_end - sec_start) as usize];
        if !new_table {
            let current = page.read(&*self.storage, page_off)?;
            entries.copy_from_slice(&current[sec_start as usize..sec_end as usize]);
        }
        for i in 0..n {
            entries[(page_first - sec_start + i) as usize] = value(i);
        }
        let mut bytes = vec![0u8; entries.len() * 8];
        encode_entries(&entries, &mut bytes);
        let at = table + page_base + sec_start * 8;
        self.storage
            .write_at(&bytes, at)
            .context(|| format!("writing the L2 table at {table:#x} of {}", self.name))?;
        if new_table {
            self.flush_storage()?;
            let mut l1 = self.l1.read().unwrap_or_else(|p| p.into_inner()).clone();
            l1[l1_index as usize] = table;
            self.write_l1_sectors(&l1, l1_index, 1)?;
            self.l1.write().unwrap_or_else(|p| p.into_inner())[l1_index as usize] = table;
        } else {
            let mut current = page.write(&*self.storage, page_off)?;
            current[sec_start as usize..sec_end as usize].copy_from_slice(&entries);
        }
        Ok(())
    }

    fn write_zeroes_guest(&self, pos: u64, len: u64) -> Result<()> {
        self.writable(pos, len)?;
        let cs = self.geometry.cluster_size();
        let end = pos + len;
        let mut p = pos;
        while p < end {
            let (mapping, run) = self.lookup(p, end - p)?;
            let whole = self.geometry.is_cluster_aligned(p) && end - p >= cs;
            // Whole clusters in one go; a partial cluster on its own.
            let n = if whole {
                run / cs * cs
            } else {
                run.min(cs - self.geometry.offset_in_cluster(p))
            };
            let needs_work = p < self.backing_size();
            p += match mapping {
                Mapping::Data(off) => {
                    self.storage
                        .zero_range(off, n)
                        .context(|| format!("zeroing {n} bytes at {off:#x} of {}", self.name))?;
                    n
                }
                Mapping::Zero => n,
                // Without backing data below, unallocated already reads as zeros.
                Mapping::Unallocated if !needs_work => n,
                Mapping::Unallocated if whole => self.zero_clusters(p, n)?,
                Mapping::Unallocated => {
                    let zeros = vec![0u8; n as usize];
                    self.write_allocating(&zeros, p)? as u64
                }
            };
        }
        Ok(())
    }

    /// Turns unallocated whole clusters at `pos` into zero clusters. Returns how many
    /// bytes it covered: 0 when another writer changed them first.
    fn zero_clusters(&self, pos: u64, len: u64) -> Result<u64> {
        let mut st = self.lock_alloc();
        let (mapping, run) = self.lookup(pos, len)?;
        if mapping != Mapping::Unallocated {
            return Ok(0);
        }
        self.prepare_allocation(&mut st)?;
        let cs = self.geometry.cluster_size();
        let n = run / cs;
        self.set_l2_entries(&mut st, pos, n, |_| ZERO_CLUSTER)?;
        Ok(n * cs)
    }

    fn discard_guest(&self, pos: u64, len: u64) -> Result<()> {
        self.writable(pos, len)?;
        let cs = self.geometry.cluster_size();
        let mut p = pos.next_multiple_of(cs);
        let end = self.geometry.cluster_start(pos + len);
        while p < end {
            let (mapping, n) = self.lookup(p, end - p)?;
            if let Mapping::Data(off) = mapping {
                self.storage
                    .zero_range(off, n)
                    .context(|| format!("discarding {n} bytes at {off:#x} of {}", self.name))?;
            }
            p += n;
        }
        Ok(())
    }

    /// Flushes the file, then clears NEED_CHECK if this session set it.
    pub(super) fn flush_image(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.flush_storage()?;
        // Holding the allocation lock means no allocation is in flight.
        let _st = self.lock_alloc();
        let mut header = self.header_read().clone();
        if header.needs_check() {
            header.features &= !crate::format::features::NEED_CHECK;
            self.write_header(&header)?;
            self.flush_storage()?;
            *self.header.write().unwrap_or_else(|p| p.into_inner()) = header;
        }
        Ok(())
    }

    fn status(&self, pos: u64, len: u64) -> Result<BlockStatus> {
        check_range(pos, len, self.size())?;
        let (mapping, n) = self.lookup(pos, len)?;
        Ok(match mapping {
            // Like QEMU, a data cluster is reported as data even where the file has a
            // hole (QEMU only looks through to the file for qcow2's preallocation).
            Mapping::Data(off) => BlockStatus {
                len: n,
                allocated: true,
                data: true,
                zero: false,
                offset: Some(off),
            },
            Mapping::Zero => BlockStatus {
                len: n,
                allocated: true,
                data: false,
                zero: true,
                offset: None,
            },
            Mapping::Unallocated => BlockStatus {
                len: n,
                allocated: false,
                data: false,
                zero: self.backing.is_none(),
                offset: None,
            },
        })
    }
}

impl BlockDevice for Image {
    fn size(&self) -> u64 {
        self.header_read().image_size
    }

    fn format(&self) -> Format {
        Format::Qed
    }

    fn filename(&self) -> &str {
        &self.name
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_guest(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_guest(buf, offset)
    }

    /// Whole clusters: data clusters are zeroed in place (their space released where the
    /// filesystem can), unallocated clusters over a backing file become zero clusters,
    /// and anything already reading as zeros is left alone. Partial clusters get zeros
    /// written only where they would not read as zeros already.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes_guest(offset, len)
    }

    /// Every data cluster wholly inside the range reads as zeros afterwards and its space
    /// is released to the filesystem; the cluster stays allocated, so no cluster is leaked
    /// and `qemu-img check` stays clean. Partial clusters, zero clusters and unallocated
    /// clusters are left as they are. (QEMU ignores discards on QED images.)
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_guest(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.flush_image()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.status(offset, len)
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_ref().and_then(|b| b.device.as_deref())
    }
}
