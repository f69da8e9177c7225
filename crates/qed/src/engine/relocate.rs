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

/// Starts a job that moves clusters; refused while another runs.
pub(super) fn begin_reorganizing(image: &Image) -> Result<Reorganizing<'_>> {
    let Some(job) = image.alloc.begin_job() else {
        return Err(Error::Unsupported(format!(
            "{}: a compaction or defragmentation is already running",
            image.name
        )));
    };
    Ok(Reorganizing { image, _job: job })
}

/// Moves data clusters, each to space the caller owns. A cluster no longer at its
/// expected place is left alone, and its destination reported unused.
pub(super) fn move_clusters(image: &Image, moves: &[ClusterMove]) -> Result<Moved> {
    let cs = image.geometry.cluster_size();
    let _moving = image.alloc.begin_moves();
    let mut moves = moves.to_vec();
    moves.sort_by_key(|m| m.guest);
    let _claims: Vec<ClusterClaim<'_>> = moves
        .iter()
        .map(|m| image.alloc.claim(m.guest / cs, 1))
        .collect();
    // Writes in place that looked before the claims were taken are done after this.
    image.alloc.synchronize();
    let mut out = Moved::default();
    let mut live = Vec::with_capacity(moves.len());
    for m in moves {
        match image.lookup(m.guest, cs)? {
            (Mapping::Data(off), _) if off == m.from => live.push(m),
            _ => out.unused.push(m.to),
        }
    }
    if let Err(e) = copy_moves(image, &live).and_then(|()| image.flush_storage()) {
        out.unused.extend(live.iter().map(|m| m.to));
        image
            .alloc
            .give_back(&out.unused.iter().map(|&at| (at, cs)).collect::<Vec<_>>());
        return Err(e);
    }
    let _gate = image.alloc.gate_shared();
    for (i, m) in live.iter().enumerate() {
        if let Err(e) = image.set_l2_entries(m.guest, 1, true, |_| m.to) {
            // Those not swapped keep their old place; their copies are unused.
            let rest: Vec<(u64, u64)> = live[i..].iter().map(|m| (m.to, cs)).collect();
            image.alloc.give_back(&rest);
            release_moved(image, &live[..i]);
            return Err(e);
        }
    }
    release_moved(image, &live);
    out.moved = live.len() as u64;
    Ok(out)
}

/// Frees the data clusters of `candidates` (guest offset, file offset) whose bytes
/// are all holes in the file (a close parked them, or an older discard only punched
/// them): they read as zeros, as the entry that replaces them does (unallocated, or
/// a zero cluster where a backing file would show through). Frozen as for a move, so
/// that no write in place lands in a cluster while it is found empty and dropped.
/// Returns how many were freed.
pub(super) fn free_punched(image: &Image, candidates: &[(u64, u64)]) -> Result<u64> {
    let cs = image.geometry.cluster_size();
    let _moving = image.alloc.begin_moves();
    let mut candidates = candidates.to_vec();
    candidates.sort_unstable();
    let _claims: Vec<ClusterClaim<'_>> = candidates
        .iter()
        .map(|&(guest, _)| image.alloc.claim(guest / cs, 1))
        .collect();
    image.alloc.synchronize();
    let backing_end = image.backing_size();
    let _gate = image.alloc.gate_shared();
    let mut freed = 0;
    for (guest, file) in candidates {
        if !matches!(image.lookup(guest, cs)?.0, Mapping::Data(off) if off == file) {
            continue;
        }
        let (hole, n) = image
            .storage
            .zero_status(file, cs)
            .context(|| format!("looking for holes at {file:#x} of {}", image.name))?;
        if !hole || n < cs {
            continue;
        }
        let entry = if guest < backing_end {
            ZERO_CLUSTER
        } else {
            UNALLOCATED
        };
        image.set_l2_entries(guest, 1, true, |_| entry)?;
        image.alloc.free(file, cs, true, Some(guest));
        freed += 1;
    }
    Ok(freed)
}

/// The old places of swapped clusters go to the free set.
fn release_moved(image: &Image, moved: &[ClusterMove]) {
    let cs = image.geometry.cluster_size();
    for m in moved {
        image.alloc.free(m.from, cs, false, None);
    }
}

/// Copies each move's cluster; runs contiguous at both ends go in one read and one
/// write of at most [`COPY_CHUNK`].
fn copy_moves(image: &Image, moves: &[ClusterMove]) -> Result<()> {
    let cs = image.geometry.cluster_size();
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
        copy_within_file(image, &mut buf[..n * cs as usize], first.from, first.to)?;
        i += n;
    }
    Ok(())
}

/// Copies `buf.len()` bytes of the file from `from` to `to`, through `buf`.
fn copy_within_file(image: &Image, buf: &mut [u8], from: u64, to: u64) -> Result<()> {
    let n = buf.len();
    image.storage.read_at(buf, from).context(|| {
        format!(
            "reading {n} bytes at {from:#x} of {} to move them",
            image.name
        )
    })?;
    image
        .storage
        .write_at(buf, to)
        .context(|| format!("writing {n} moved bytes at {to:#x} of {}", image.name))
}

/// Moves the L2 table of L1 entry `l1_index` from `from` to `to` (free space of a
/// table's size the caller owns). `false` when the table is no longer at `from`.
pub(super) fn move_table(image: &Image, l1_index: u64, from: u64, to: u64) -> Result<bool> {
    let _exclusive = image.alloc.gate_exclusive();
    if image.l1_entry(l1_index)? != from {
        return Ok(false);
    }
    // The file must hold what memory holds before it is copied.
    image.write_back_tables()?;
    let bytes = image.geometry.table_bytes();
    let mut buf = AlignedBuf::new(bytes.min(COPY_CHUNK) as usize);
    let mut done = 0;
    while done < bytes {
        let n = (bytes - done).min(COPY_CHUNK) as usize;
        copy_within_file(image, &mut buf[..n], from + done, to + done)?;
        done += n as u64;
    }
    image.flush_storage()?;
    image
        .tables
        .retarget(image.table_file(), l1_index, from, to)?;
    image.alloc.free(from, bytes, false, None);
    Ok(true)
}
