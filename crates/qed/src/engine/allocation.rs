//! The allocation protocol, in one place for every caller (the threaded write path, zero
//! writes, and writes that io_uring callers carry out themselves):
//!
//! 1. claim the guest clusters of the unallocated (or zero) run, then look the mapping
//!    up again: whoever allocated them before has finished, and nobody else can start,
//!    so this lookup is the truth;
//! 2. enter the allocation gate (shared), and for data in an image without a backing
//!    file make NEED_CHECK durable first;
//! 3. reserve new space: for data, the clusters a discard freed from these very guest
//!    clusters if they are still free (taken back in the gate, the claim shrunk to what
//!    one place serves), else freed clusters ready to reuse, else at the frontier;
//! 4. once the data is written, set the entries (creating the L2 table if needed).
//!
//! Dropping an [`Allocation`] before step 4 gives up the claim and the gate; space it
//! reserved stays unreferenced (a leak, reclaimed by the next repair, or trimmed at
//! close when it was the last).

use super::claims::ClusterClaim;
use super::free_set::Reclaim;
use super::gate::GateHold;
use super::image::Image;
use super::mapping::Mapping;
use crate::error::Result;
use crate::format::table::ZERO_CLUSTER;

/// Whether a step may wait for other requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// Block until the clusters (or the gate) are free.
    Block,
    /// Give up instead (io_uring callers, which must never block).
    Never,
}

/// An allocation in progress over whole guest clusters.
///
/// One taken with [`Wait::Never`] promises its caller never to block, and an io_uring
/// caller holds O_DIRECT block locks of its own writes in flight while it finishes one.
/// Such an allocation therefore does no metadata I/O that could wait for those locks: it
/// declines to start when it would have to set NEED_CHECK or when the L2 cache is at its
/// dirty limit, and its entries are never written back on the spot.
pub(super) struct Allocation<'a> {
    image: &'a Image,
    wait: Wait,
    _claim: ClusterClaim<'a>,
    gate: Option<GateHold<'a>>,
    /// Guest offset of the first claimed cluster.
    first: u64,
    /// Claimed clusters.
    clusters: u64,
    /// What the clusters held when claimed: [`Mapping::Unallocated`] or
    /// [`Mapping::Zero`].
    pub(super) was: Mapping,
    /// Bytes of the request, from its start, that lie in the claimed clusters.
    pub(super) len: u64,
    /// Bytes from the first claimed cluster's start to the request's.
    head: u64,
    /// The clusters a discard freed from the claimed ones, taken back for them (see
    /// [`Allocation::take_back_freed`]); returned to the free set if they are not
    /// mapped.
    reclaimed: Option<u64>,
}

/// Step 1: claims the clusters of the unallocated or zero run at `pos` (at most
/// `len` bytes) and looks again under the claim. `None` when the first cluster turned
/// out to be data (someone else allocated it), or, with [`Wait::Never`], when another
/// request holds one of the clusters.
pub(super) fn claim_allocation(
    image: &Image,
    pos: u64,
    len: u64,
    wait: Wait,
) -> Result<Option<Allocation<'_>>> {
    let cs = image.geometry.cluster_size();
    let first = image.geometry.cluster_start(pos);
    let (mut claim, n) = loop {
        let (mapping, n) = image.lookup(pos, len)?;
        if let Mapping::Data(_) = mapping {
            return Ok(None);
        }
        let count = ((pos + n).next_multiple_of(cs) - first) / cs;
        if let Some(c) = image.alloc.try_claim(first / cs, count) {
            break (c, n);
        }
        if wait == Wait::Never {
            return Ok(None);
        }
        // Whoever holds them is most likely allocating them: once they are
        // released, the next look usually finds data to write in place.
        image.alloc.wait_released(first / cs, count);
    };
    let (was, n) = image.lookup(pos, n)?;
    if let Mapping::Data(_) = was {
        return Ok(None);
    }
    let clusters = ((pos + n).next_multiple_of(cs) - first) / cs;
    claim.shrink(clusters);
    Ok(Some(Allocation {
        image,
        wait,
        _claim: claim,
        gate: None,
        first,
        clusters,
        was,
        len: n,
        head: pos - first,
        reclaimed: None,
    }))
}

/// Sets `bytes` aside (see [`super::allocator::Allocator::reserve`]). Returns where.
pub(super) fn reserve(image: &Image, bytes: u64) -> Result<u64> {
    image
        .alloc
        .reserve(&*image.storage, bytes, &image.name, || {
            image.flush_storage()
        })
}

impl<'a> Allocation<'a> {
    /// Step 2: enters the allocation gate; for an allocation that will put `data` into an
    /// image without a backing file, NEED_CHECK is made durable first. `false` when, with
    /// [`Wait::Never`], the gate is closed or metadata would have to be written first.
    pub(super) fn enter_gate(&mut self, data: bool) -> Result<bool> {
        let image = self.image;
        let needs_mark = data && !image.backing_present();
        let gate = match self.wait {
            Wait::Block => image.alloc.gate_shared(),
            Wait::Never => match image.alloc.try_gate_shared() {
                Some(g) => g,
                None => return Ok(false),
            },
        };
        // Setting NEED_CHECK rewrites the header's block, and a write-back rewrites table
        // sectors: under O_DIRECT each waits for the writes in flight to its block's lock
        // stripe, which an io_uring caller may hold itself, unreaped. Those allocations
        // take the blocking path instead. (With the gate held, no flush can clear
        // NEED_CHECK after this look.)
        if self.wait == Wait::Never
            && ((needs_mark && !image.header.get().needs_check()) || image.tables.dirty_at_limit())
        {
            return Ok(false);
        }
        self.gate = Some(gate);
        if needs_mark {
            image.header.mark_need_check(&*image.storage, &image.name)?;
        }
        Ok(true)
    }

    /// Step 2, for data, once in the gate: takes back the clusters a discard freed
    /// from the first claimed ones, which still read as zeros (their entry does), and
    /// keeps the claim to the clusters one place serves: those, or those before the
    /// first that a discard freed. Every freed cluster thus goes back to its own guest
    /// cluster when that is written again, never stranded behind new data where a close
    /// could not park it (see `flush.rs`). Inside the gate, so that a check (which holds
    /// it exclusively) never finds them neither free nor mapped. `false` when, with
    /// [`Wait::Never`], a flush under way holds them.
    pub(super) fn take_back_freed(&mut self) -> Result<bool> {
        let image = self.image;
        loop {
            let bytes = match image.alloc.reclaim(self.first, self.span()) {
                Reclaim::Nothing => return Ok(true),
                Reclaim::Taken { at, len } => {
                    self.reclaimed = Some(at);
                    len
                }
                Reclaim::Elsewhere { len } => len,
                Reclaim::Busy if self.wait == Wait::Never => return Ok(false),
                Reclaim::Busy => {
                    // The flush may need the gate exclusively before it ends.
                    self.gate = None;
                    image.alloc.wait_flush_end();
                    self.enter_gate(true)?;
                    continue;
                }
            };
            let cs = image.geometry.cluster_size();
            self.clusters = bytes / cs;
            self._claim.shrink(self.clusters);
            self.len = self.len.min(bytes - self.head);
            return Ok(true);
        }
    }

    /// Step 3: reserves the new clusters (the very ones a discard freed from them, if
    /// [`Allocation::take_back_freed`] took them back). Returns where the first one
    /// starts.
    pub(super) fn reserve(&self) -> Result<u64> {
        if let Some(at) = self.reclaimed {
            self.image.storage.preallocate(at, self.span());
            return Ok(at);
        }
        self.image.reserve(self.span())
    }

    /// Step 3 when only `n` of the claimed clusters will hold data (the rest becoming
    /// zero clusters). Returns where the first new one starts.
    pub(super) fn reserve_clusters(&self, n: u64) -> Result<u64> {
        self.image.reserve(n * self.image.geometry.cluster_size())
    }

    /// Guest offset of the first claimed cluster.
    pub(super) fn first(&self) -> u64 {
        self.first
    }

    /// Bytes the claimed clusters span.
    pub(super) fn span(&self) -> u64 {
        self.clusters * self.image.geometry.cluster_size()
    }

    /// Step 4 for data: maps the clusters to the space reserved at `at`, whose data the
    /// caller has written.
    pub(super) fn map_data(mut self, at: u64) -> Result<()> {
        // Mapped, or, if that fails, perhaps named by an entry: never free again.
        self.reclaimed = None;
        let cs = self.image.geometry.cluster_size();
        let write_back = self.wait == Wait::Block;
        self.image
            .set_l2_entries(self.first, self.clusters, write_back, |i| at + i * cs)
    }

    /// Step 4 for a mix: sets the entry of the `i`th claimed cluster to `entry(i)`, a
    /// data cluster the caller has written or [`ZERO_CLUSTER`].
    pub(super) fn map_entries(mut self, entry: impl Fn(u64) -> u64) -> Result<()> {
        self.reclaimed = None;
        let write_back = self.wait == Wait::Block;
        self.image
            .set_l2_entries(self.first, self.clusters, write_back, entry)
    }

    /// Step 4 for zeros: makes the clusters zero clusters.
    pub(super) fn map_zero(self) -> Result<()> {
        debug_assert!(self.reclaimed.is_none(), "zeros take no space");
        let write_back = self.wait == Wait::Block;
        self.image
            .set_l2_entries(self.first, self.clusters, write_back, |_| ZERO_CLUSTER)
    }
}

impl Drop for Allocation<'_> {
    /// Clusters taken back and not mapped go back to the free set, with their guest
    /// cluster: they may hold part of a write now, so they are punched again on the way.
    fn drop(&mut self) {
        if let Some(at) = self.reclaimed.take() {
            self.image
                .alloc
                .free(at, self.span(), false, Some(self.first));
        }
    }
}
