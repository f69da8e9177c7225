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
use super::{Image, Mapping, ENTRIES_PER_SECTOR};
use crate::block::{check_range, BlockDevice, BlockStatus, DirectExtent, Format, PendingWrite};
use crate::error::{Error, IoContext, Result};
use crate::format::table::encode_entries;
use crate::format::table::ZERO_CLUSTER;
use std::sync::atomic::Ordering;

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
        let Some((mapping, n, _claim)) = self.claim_unallocated(pos, buf.len() as u64)? else {
            return Ok(0);
        };
        let _gate = self.begin_allocation(true)?;
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
        // The entries reach the file at the next write-back, which flushes this data
        // first when a backing file is there (see `write_back_tables`).
        self.set_l2_entries(first, nclusters, |i| new_off + i * cs)?;
        Ok(n as usize)
    }

    /// Claims the clusters of the unallocated or zero run at `pos` (at most `len` bytes)
    /// and looks again under the claim. `None` when the first cluster turned out to be
    /// data: someone else allocated it.
    fn claim_unallocated(
        &self,
        pos: u64,
        len: u64,
    ) -> Result<Option<(Mapping, u64, super::alloc::ClusterClaim<'_>)>> {
        let (mapping, n) = self.lookup(pos, len)?;
        if let Mapping::Data(_) = mapping {
            return Ok(None);
        }
        let g = self.geometry;
        let cs = g.cluster_size();
        let first = g.cluster_start(pos);
        let count = ((pos + n).next_multiple_of(cs) - first) / cs;
        let mut claim = self.claims.clusters(first / cs, count);
        // Nobody else allocates these clusters now, and whoever did before has finished:
        // this lookup is the truth.
        let (mapping, n) = self.lookup(pos, n)?;
        if let Mapping::Data(_) = mapping {
            return Ok(None);
        }
        claim.shrink(((pos + n).next_multiple_of(cs) - first) / cs);
        Ok(Some((mapping, n, claim)))
    }

    /// Enters the allocation gate; for allocations that will write data into new
    /// clusters of an image without a backing file, first makes NEED_CHECK durable.
    fn begin_allocation(&self, data: bool) -> Result<std::sync::RwLockReadGuard<'_, ()>> {
        let gate = self.gate.shared();
        self.mark_need_check(data)?;
        Ok(gate)
    }

    /// Sets NEED_CHECK, durably, before data goes into new clusters of an image without
    /// a backing file. The caller holds the gate.
    fn mark_need_check(&self, data: bool) -> Result<()> {
        // With a backing file every L2 entry is written only after a flush of its data,
        // so a crash cannot leave an entry pointing at unwritten data: no check needed.
        if data && self.backing.is_none() && !self.header_read().needs_check() {
            let _setting = self
                .need_check_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut header = self.header_read().clone();
            if !header.needs_check() {
                header.features |= crate::format::features::NEED_CHECK;
                self.write_header(&header)?;
                self.storage
                    .flush()
                    .context(|| format!("flushing {}", self.name))?;
                *self.header.write().unwrap_or_else(|p| p.into_inner()) = header;
            }
        }
        Ok(())
    }

    /// [`BlockDevice::begin_write`] for writes into clusters not allocated yet: when the
    /// range lies in unallocated (or zero) clusters of one page of an existing L2 table,
    /// and the rest of those clusters may read as zeros (no backing file, a zero cluster,
    /// or whole clusters), claims them, reserves new space and returns where to write;
    /// finishing maps the new clusters. `None` wherever that would wait (a claimed
    /// cluster, a closed gate) or need more (a new table, backing data to copy).
    fn begin_allocating_write(&self, pos: u64, len: u64) -> Option<PendingWrite<'_>> {
        if self.read_only || len == 0 || check_range(pos, len, self.size()).is_err() {
            return None;
        }
        let (fd, align) = self.storage.direct_fd()?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let first = g.cluster_start(pos);
        let end = (pos + len).next_multiple_of(cs);
        let n = (end - first) / cs;
        let head = pos - first;
        if head % align != 0
            || len % align != 0
            || g.l2_index(first) % PAGE_ENTRIES + n > PAGE_ENTRIES
            || g.l1_index(first) != g.l1_index(end - 1)
            || self.l1_entry(g.l1_index(first)).ok()? == 0
        {
            return None;
        }
        let whole = head == 0 && pos + len == end;
        let fits = |(mapping, run): (Mapping, u64)| {
            run >= len
                && match mapping {
                    Mapping::Unallocated => whole || self.backing.is_none(),
                    Mapping::Zero => true,
                    Mapping::Data(_) => false,
                }
        };
        if !fits(self.lookup(pos, len).ok()?) {
            return None;
        }
        let claim = self.claims.try_clusters(first / cs, n)?;
        // Under the claim nobody else allocates these clusters: this lookup is the truth.
        if !fits(self.lookup(pos, len).ok()?) {
            return None;
        }
        let gate = self.gate.try_shared()?;
        self.mark_need_check(true).ok()?;
        let new_off = self.reserve(n * cs).ok()?;
        let extent = DirectExtent {
            fd,
            offset: new_off + head,
            align,
        };
        Some(PendingWrite::new(extent, first..end, move |written| {
            let _held = (claim, gate);
            if written {
                self.set_l2_entries(first, n, |i| new_off + i * cs)
            } else {
                Ok(())
            }
        }))
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

    /// Appends `bytes` at the frontier, growing the file first. Returns where.
    pub(super) fn reserve(&self, bytes: u64) -> Result<u64> {
        let mut grow = self.lock_grow();
        if grow.trailing_garbage {
            // A partial cluster past the frontier is unreferenced; drop it so that new
            // clusters there read as zeros. The truncation must be durable before the
            // space is reused: a crash that kept the growth below and an L2 entry for a
            // new cluster there, but lost the truncation, would expose the old bytes.
            let frontier = self.file_clusters_end();
            self.storage
                .set_len(frontier)
                .context(|| format!("truncating the partial last cluster of {}", self.name))?;
            self.flush_storage()?;
            grow.trailing_garbage = false;
            grow.file_len = frontier;
        }
        let old = self.file_clusters_end();
        let new = old.checked_add(bytes).ok_or_else(|| {
            Error::Unsupported(format!("{}: the file would exceed 2^64 bytes", self.name))
        })?;
        if new > grow.file_len {
            grow.file_len = self
                .storage
                .extend(grow.file_len, new)
                .context(|| format!("growing {} to {new} bytes", self.name))?;
        }
        self.frontier.store(new, Ordering::Release);
        Ok(old)
    }

    /// Writes the L2 entries changed in memory since the last write-back. With a backing
    /// file the data they expose must be durable first (a crash must never show a
    /// cluster of zeros where the backing file had data), so the file is flushed before
    /// they are written: one flush for every allocation since the last write-back, where
    /// QEMU flushes once per allocation. Without a backing file no flush is needed:
    /// NEED_CHECK is set, and an entry whose data did not reach the disk reads as zeros,
    /// as the cluster did before.
    ///
    /// Write-backs are serialized, so that a flush never overtakes entries another
    /// caller's write-back has taken but not yet written.
    pub(super) fn write_back_tables(&self) -> Result<()> {
        let _one = self
            .write_back_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.l2.write_back(&*self.storage, || {
            if self.backing.is_some() {
                self.flush_storage()
            } else {
                Ok(())
            }
        })
    }

    /// Flushes the file, sharing the flush with concurrent callers.
    pub(super) fn flush_storage(&self) -> Result<()> {
        self.flushes
            .flush(|| self.storage.flush())
            .context(|| format!("flushing {}", self.name))
    }

    /// Sets the L2 entries of `n` clusters from guest offset `first` (all inside one page
    /// of entries) to `value(i)`, creating the L2 table if there is none. The caller holds
    /// the claim on those clusters and the allocation gate.
    fn set_l2_entries(&self, first: u64, n: u64, value: impl Fn(u64) -> u64) -> Result<()> {
        let g = self.geometry;
        let l1_index = g.l1_index(first);
        let l2_index = g.l2_index(first);
        let page_first = l2_index % PAGE_ENTRIES;
        let updates: Vec<(usize, u64)> = (0..n)
            .map(|i| ((page_first + i) as usize, value(i)))
            .collect();
        loop {
            let l2_offset = self.l1_entry(l1_index)?;
            if l2_offset != 0 {
                self.check_l2_offset(l1_index, l2_offset)?;
                let dirty = self.l2.set(&*self.storage, l2_offset, l2_index, &updates)?;
                if dirty > self.l2.dirty_limit() {
                    // Dirty pages cannot be evicted: keep them within the cache's bound.
                    self.write_back_tables()?;
                }
                return Ok(());
            }
            let Some(_table_claim) = self.claims.table(l1_index) else {
                continue; // someone else was creating the table: look again
            };
            if self.l1_entry(l1_index)? != 0 {
                continue;
            }
            return self.create_l2_table(l1_index, l2_index, &updates);
        }
    }

    /// Creates the L2 table for `l1_index` holding `updates` (page-relative indices of the
    /// page holding `l2_index`): its non-zero sectors are written, flushed, and only then
    /// is the L1 entry written.
    fn create_l2_table(
        &self,
        l1_index: u64,
        l2_index: u64,
        updates: &[(usize, u64)],
    ) -> Result<()> {
        let g = self.geometry;
        let table = self.reserve(g.table_bytes())?;
        let page_base = (l2_index - l2_index % PAGE_ENTRIES) * 8;
        let lo = updates.iter().map(|u| u.0).min().unwrap_or(0) as u64;
        let hi = updates.iter().map(|u| u.0).max().unwrap_or(0) as u64;
        let sec_start = lo / ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR;
        let sec_end = (hi / ENTRIES_PER_SECTOR + 1) * ENTRIES_PER_SECTOR;
        let mut entries = vec![0u64; (sec_end - sec_start) as usize];
        for &(i, v) in updates {
            entries[i - sec_start as usize] = v;
        }
        let mut bytes = vec![0u8; entries.len() * 8];
        encode_entries(&entries, &mut bytes);
        let at = table + page_base + sec_start * 8;
        self.storage
            .write_at(&bytes, at)
            .context(|| format!("writing the new L2 table at {table:#x} of {}", self.name))?;
        self.flush_storage()?;
        let _l1 = self.l1_lock.lock().unwrap_or_else(|p| p.into_inner());
        let first = l1_index / ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR;
        let sector = {
            let l1 = self.l1.read().unwrap_or_else(|p| p.into_inner());
            let end = (first + ENTRIES_PER_SECTOR).min(l1.len() as u64);
            let mut sector = l1[first as usize..end as usize].to_vec();
            sector[(l1_index - first) as usize] = table;
            sector
        };
        self.write_l1_sectors(&sector, first)?;
        self.l1.write().unwrap_or_else(|p| p.into_inner())[l1_index as usize] = table;
        Ok(())
    }

    fn write_zeroes_guest(&self, pos: u64, len: u64) -> Result<()> {
        self.writable(pos, len)?;
        self.zero_walk(pos, len, true).map(|_| ())
    }

    /// Walks the range as a zero write does. With `apply`, zeroes it; without, changes
    /// nothing and answers whether zeroing would be fast: false as soon as a part would
    /// need data written (a partial cluster over backing data). Returns true when applied.
    fn zero_walk(&self, pos: u64, len: u64, apply: bool) -> Result<bool> {
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
            if !apply {
                if matches!(mapping, Mapping::Unallocated) && needs_work && !whole {
                    return Ok(false);
                }
                p += n;
                continue;
            }
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
                    // At most a megabyte of zeros (a cluster can be 64 MiB): the rest of
                    // the cluster is then allocated, and zeroed in place.
                    let zeros = vec![0u8; n.min(COPY_CHUNK) as usize];
                    self.write_allocating(&zeros, p)? as u64
                }
            };
        }
        Ok(true)
    }

    /// Turns unallocated whole clusters at `pos` into zero clusters. Returns how many
    /// bytes it covered: 0 when another writer changed them first.
    fn zero_clusters(&self, pos: u64, len: u64) -> Result<u64> {
        let Some((mapping, run, _claim)) = self.claim_unallocated(pos, len)? else {
            return Ok(0);
        };
        if mapping != Mapping::Unallocated {
            return Ok(0);
        }
        let _gate = self.begin_allocation(false)?;
        let cs = self.geometry.cluster_size();
        let n = run / cs;
        self.set_l2_entries(pos, n, |_| ZERO_CLUSTER)?;
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

    /// Flushes the file. When NEED_CHECK is set, waits for the allocations in flight,
    /// flushes what they wrote, and clears it.
    pub(super) fn flush_image(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if !self.header_read().needs_check() || self.unchecked.load(Ordering::Acquire) {
            self.write_back_tables()?;
            return self.flush_storage();
        }
        let _exclusive = self.gate.exclusive();
        self.write_back_tables()?;
        self.flush_storage()?;
        let mut header = self.header_read().clone();
        if header.needs_check() {
            header.features &= !crate::format::features::NEED_CHECK;
            let result = self
                .write_header(&header)
                .and_then(|()| self.flush_storage());
            // Even a failed write may have cleared the bit in the file: the next
            // allocation must set it again rather than trust it is still there.
            *self.header.write().unwrap_or_else(|p| p.into_inner()) = header;
            result?;
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

    /// Fast unless part of the range is a partial cluster over backing data, which
    /// allocates a cluster and copies the rest of it from the backing file.
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> Result<bool> {
        check_range(offset, len, self.size())?;
        self.zero_walk(offset, len, false)
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

    fn begin_write(&self, offset: u64, len: u64) -> Option<PendingWrite<'_>> {
        match self.direct_extent(offset, len, true) {
            Some(x) => {
                let hold = self.storage.try_hold_blocks(x.offset, len)?;
                Some(PendingWrite::new(x, 0..0, move |_| {
                    drop(hold);
                    Ok(())
                }))
            }
            None => self.begin_allocating_write(offset, len),
        }
    }

    /// A range inside one data cluster run, or (to read) one the backing file supplies.
    /// QED never moves or frees a data cluster while the image is open (only a repair or
    /// shrink, which need `&mut self`, do), so the extent stays right for as long as the
    /// caller borrows the image.
    fn direct_extent(&self, offset: u64, len: u64, write: bool) -> Option<DirectExtent> {
        if (write && self.read_only) || check_range(offset, len, self.size()).is_err() {
            return None;
        }
        let (fd, align) = self.storage.direct_fd()?;
        match self.lookup(offset, len).ok()? {
            (Mapping::Data(off), n) if n >= len => Some(DirectExtent {
                fd,
                offset: off,
                align,
            }),
            // Reads the backing file supplies whole come from there.
            (Mapping::Unallocated, n) if n >= len && !write => {
                let backing = self.backing.as_ref()?.device.as_deref()?;
                backing.direct_extent(offset, len, false)
            }
            _ => None,
        }
    }
}
