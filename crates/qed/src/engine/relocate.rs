//! Moving clusters while the image is in use (compaction, defragmentation): freeze,
//! copy, swap the entry, free the old place.
//!
//! A data cluster is frozen by claiming its guest cluster, as an allocation would:
//! allocations, fills and discards of it wait for the claim. Writes in place take no
//! claim, so while a move is under way (`Image::relocating`) they look for one and wait
//! for its release, then look the cluster up again and write where it is now. Writes in
//! place that started before the move announced itself are waited for (an epoch passes)
//! before anything is copied. Reads are never stopped: the old place keeps its bytes
//! until every request that could have followed the old entry has finished, and the
//! free set reuses it only after that and after the swap is durable.
//!
//! Order on disk: the copy is flushed before the entry naming it is written (entries are
//! written back at the next flush, like any allocation's), so a crash leaves each
//! cluster at its old place or its new one, intact either way.
//!
//! An L2 table moves with the allocation gate held exclusively: its entries are written
//! back, the table copied and flushed, then its L1 entry rewritten.

use super::allocator::JobHold;
use super::claims::ClusterClaim;
use super::image::Image;
use super::io::COPY_CHUNK;
use super::mapping::Mapping;
use crate::error::{Error, IoContext, Result};
use crate::format::table::{UNALLOCATED, ZERO_CLUSTER};
use crate::storage::AlignedBuf;

/// One data cluster to move: the guest cluster at `guest`, expected at file offset
/// `from`, copied to `to` (free space the caller owns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClusterMove {
    pub(crate) guest: u64,
    pub(crate) from: u64,
    pub(crate) to: u64,
}

/// What a batch of moves did.
#[derive(Debug, Default)]
pub(crate) struct Moved {
    /// Moves carried out.
    pub(crate) moved: u64,
    /// Destinations left unused (the cluster was discarded or moved meanwhile); the
    /// caller still owns them.
    pub(crate) unused: Vec<u64>,
}

/// A job that moves clusters (one at a time per image): while it runs, clusters that
/// become free are the job's to fill, not allocations'.
pub(crate) struct Reorganizing<'a> {
    image: &'a Image,
    _job: JobHold<'a>,
}

impl Reorganizing<'_> {
    /// Takes the clusters that became ready to reuse (freed by the job's own moves, or
    /// by discards), which nobody else gets while the job runs.
    pub(crate) fn take_ready(&self) -> Vec<u64> {
        let cs = self.image.geometry.cluster_size();
        self.image
            .alloc
            .take_all_ready()
            .into_iter()
            .flat_map(|(at, len)| (0..len / cs).map(move |i| at + i * cs))
            .collect()
    }

    /// Sets `bytes` aside at the frontier for the job to move clusters into.
    pub(crate) fn reserve_at_end(&self, bytes: u64) -> Result<u64> {
        let image = self.image;
        image
            .alloc
            .reserve_at_end(&*image.storage, bytes, &image.name, || {
                image.flush_storage()
            })
    }
}

impl Image {
    /// Starts a job that moves clusters; refused while another runs.
    pub(crate) fn begin_reorganizing(&self) -> Result<Reorganizing<'_>> {
        let Some(job) = self.alloc.begin_job() else {
            return Err(Error::Unsupported(format!(
                "{}: a compaction or defragmentation is already running",
                self.name
            )));
        };
        Ok(Reorganizing {
            image: self,
            _job: job,
        })
    }

    /// Whether a write in place to the `len` bytes at `pos` must wait: a move holds one
    /// of their clusters.
    pub(super) fn is_frozen(&self, pos: u64, len: u64) -> bool {
        let cs = self.geometry.cluster_size();
        let first = pos / cs;
        self.alloc
            .is_frozen(first, (pos + len).div_ceil(cs) - first)
    }

    /// Waits until no claim holds the clusters of the `len` bytes at `pos`.
    pub(super) fn wait_thawed(&self, pos: u64, len: u64) {
        let cs = self.geometry.cluster_size();
        let first = pos / cs;
        self.alloc
            .wait_released(first, (pos + len).div_ceil(cs) - first);
    }

    /// Moves data clusters, each to space the caller owns. A cluster no longer at its
    /// expected place is left alone, and its destination reported unused.
    pub(crate) fn move_clusters(&self, moves: &[ClusterMove]) -> Result<Moved> {
        let cs = self.geometry.cluster_size();
        let _moving = self.alloc.begin_moves();
        let mut moves = moves.to_vec();
        moves.sort_by_key(|m| m.guest);
        let _claims: Vec<ClusterClaim<'_>> = moves
            .iter()
            .map(|m| self.alloc.claim(m.guest / cs, 1))
            .collect();
        // Writes in place that looked before the claims were taken are done after this.
        self.alloc.synchronize();
        let mut out = Moved::default();
        let mut live = Vec::with_capacity(moves.len());
        for m in moves {
            match self.lookup(m.guest, cs)? {
                (Mapping::Data(off), _) if off == m.from => live.push(m),
                _ => out.unused.push(m.to),
            }
        }
        if let Err(e) = self.copy_moves(&live).and_then(|()| self.flush_storage()) {
            out.unused.extend(live.iter().map(|m| m.to));
            self.alloc
                .give_back(&out.unused.iter().map(|&at| (at, cs)).collect::<Vec<_>>());
            return Err(e);
        }
        let _gate = self.alloc.gate_shared();
        for (i, m) in live.iter().enumerate() {
            if let Err(e) = self.set_l2_entries(m.guest, 1, true, |_| m.to) {
                // Those not swapped keep their old place; their copies are unused.
                let rest: Vec<(u64, u64)> = live[i..].iter().map(|m| (m.to, cs)).collect();
                self.alloc.give_back(&rest);
                self.release_moved(&live[..i]);
                return Err(e);
            }
        }
        self.release_moved(&live);
        out.moved = live.len() as u64;
        Ok(out)
    }

    /// Frees the data clusters of `candidates` (guest offset, file offset) whose bytes
    /// are all holes in the file (a close parked them, or an older discard only punched
    /// them): they read as zeros, as the entry that replaces them does (unallocated, or
    /// a zero cluster where a backing file would show through). Frozen as for a move, so
    /// that no write in place lands in a cluster while it is found empty and dropped.
    /// Returns how many were freed.
    pub(crate) fn free_punched(&self, candidates: &[(u64, u64)]) -> Result<u64> {
        let cs = self.geometry.cluster_size();
        let _moving = self.alloc.begin_moves();
        let mut candidates = candidates.to_vec();
        candidates.sort_unstable();
        let _claims: Vec<ClusterClaim<'_>> = candidates
            .iter()
            .map(|&(guest, _)| self.alloc.claim(guest / cs, 1))
            .collect();
        self.alloc.synchronize();
        let backing_end = self.backing_size();
        let _gate = self.alloc.gate_shared();
        let mut freed = 0;
        for (guest, file) in candidates {
            if !matches!(self.lookup(guest, cs)?.0, Mapping::Data(off) if off == file) {
                continue;
            }
            let (hole, n) = self
                .storage
                .zero_status(file, cs)
                .context(|| format!("looking for holes at {file:#x} of {}", self.name))?;
            if !hole || n < cs {
                continue;
            }
            let entry = if guest < backing_end {
                ZERO_CLUSTER
            } else {
                UNALLOCATED
            };
            self.set_l2_entries(guest, 1, true, |_| entry)?;
            self.alloc.free(file, cs, true, Some(guest));
            freed += 1;
        }
        Ok(freed)
    }

    /// The old places of swapped clusters go to the free set.
    fn release_moved(&self, moved: &[ClusterMove]) {
        let cs = self.geometry.cluster_size();
        for m in moved {
            self.alloc.free(m.from, cs, false, None);
        }
    }

    /// Copies each move's cluster; runs contiguous at both ends go in one read and one
    /// write of at most [`COPY_CHUNK`].
    fn copy_moves(&self, moves: &[ClusterMove]) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let mut by_source = moves.to_vec();
        by_source.sort_by_key(|m| m.from);
        let most = (COPY_CHUNK / cs).max(1) as usize;
        let mut buf = AlignedBuf::new((most as u64 * cs) as usize);
        let mut i = 0;
        while i < by_source.len() {
            let first = by_source[i];
            let mut n = 1;
            while i + n < by_source.len()
                && n < most
                && by_source[i + n].from == first.from + n as u64 * cs
                && by_source[i + n].to == first.to + n as u64 * cs
            {
                n += 1;
            }
            self.copy_within_file(&mut buf[..n * cs as usize], first.from, first.to)?;
            i += n;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes of the file from `from` to `to`, through `buf`.
    fn copy_within_file(&self, buf: &mut [u8], from: u64, to: u64) -> Result<()> {
        let n = buf.len();
        self.storage.read_at(buf, from).context(|| {
            format!(
                "reading {n} bytes at {from:#x} of {} to move them",
                self.name
            )
        })?;
        self.storage
            .write_at(buf, to)
            .context(|| format!("writing {n} moved bytes at {to:#x} of {}", self.name))
    }

    /// Moves the L2 table of L1 entry `l1_index` from `from` to `to` (free space of a
    /// table's size the caller owns). `false` when the table is no longer at `from`.
    pub(crate) fn move_table(&self, l1_index: u64, from: u64, to: u64) -> Result<bool> {
        let _exclusive = self.alloc.gate_exclusive();
        if self.l1_entry(l1_index)? != from {
            return Ok(false);
        }
        // The file must hold what memory holds before it is copied.
        self.write_back_tables()?;
        let bytes = self.geometry.table_bytes();
        let mut buf = AlignedBuf::new(bytes.min(COPY_CHUNK) as usize);
        let mut done = 0;
        while done < bytes {
            let n = (bytes - done).min(COPY_CHUNK) as usize;
            self.copy_within_file(&mut buf[..n], from + done, to + done)?;
            done += n as u64;
        }
        self.flush_storage()?;
        self.tables
            .retarget(self.table_file(), l1_index, from, to)?;
        self.alloc.free(from, bytes, false, None);
        Ok(true)
    }
}
