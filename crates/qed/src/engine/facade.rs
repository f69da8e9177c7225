//! The engine's public facade: the methods of [`Image`] that other modules (and users)
//! call, each delegating to the operation that does the work, which is a function over
//! the image's parts in a file of its own. None holds state or logic of its own.

use super::allocation::{Allocation, Wait};
use super::backing_file::NewBacking;
use super::image::Image;
use super::layout::Layout;
use super::mapping::Mapping;
use super::relocate::{ClusterMove, Moved, Reorganizing};
use super::report::{CheckReport, RepairMode};
use crate::block::PendingWrite;
use crate::error::Result;
use crate::storage::RemoteIdentity;
use std::collections::BTreeSet;
use std::ops::ControlFlow;

impl Image {
    /// Changes the virtual size (rounded up to 512). Growing rewrites the header, as QEMU
    /// does, after making the new range read as zeros where a backing file reaches into
    /// it (zero clusters): the guest never saw the backing file's bytes there, perhaps
    /// because it shrank the disk to be rid of them. Shrinking needs `allow_shrink`: the
    /// clusters past the new end are dropped from the tables, then the space they used
    /// is reclaimed.
    #[inline]
    pub fn resize(&mut self, new_size: u64, allow_shrink: bool) -> Result<()> {
        super::resize::resize(self, new_size, allow_shrink)
    }

    /// The size [`Image::resize`] would give the image (`new_size` rounded up to 512),
    /// or why it would refuse. Needs no write access, so a caller can validate on a
    /// read-only open before it changes anything.
    #[inline]
    pub fn validate_resize(&self, new_size: u64, allow_shrink: bool) -> Result<u64> {
        super::resize::validate_resize(self, new_size, allow_shrink)
    }

    /// Drops every cluster: the image reads entirely from its backing file (or as zeros)
    /// and its file shrinks back to the header and L1 table.
    #[inline]
    pub fn make_empty(&mut self) -> Result<()> {
        super::resize::make_empty(self)
    }

    /// The largest backing file name this image's header area can hold.
    #[inline]
    pub fn max_backing_name_len(&self) -> u64 {
        super::backing_file::max_backing_name_len(self)
    }

    /// Records a new backing file (or none) in the header: header and name are written
    /// in one write, then flushed. No data is copied; see `ops::rebase` for that.
    #[inline]
    pub fn set_backing_file(&mut self, new: Option<NewBacking>) -> Result<()> {
        super::backing_file::set_backing_file(self, new)
    }

    /// Makes a layer of the open backing chain the backing file, while the image is in
    /// use: `Some((depth, name))` for the layer `depth` down (1 is the current backing
    /// file, as [`crate::BlockDevice::backing`] walks the chain), stored in the header as `name`; `None` for no backing file. The header
    /// is rewritten and flushed, and from then on unallocated clusters read through to
    /// that layer (or as zeros).
    ///
    /// The caller has copied into the image every cluster the layers above it supply
    /// (`ops::stream`): what the guest reads does not change. Every allocation in
    /// flight finishes first and the image is flushed, so the new header never names
    /// less than the entries on disk need.
    #[inline]
    pub fn cut_backing(&self, keep: Option<(u32, &str)>) -> Result<()> {
        super::backing_file::cut_backing(self, keep)
    }

    /// The identity of the remote base this image is pinned to: what the object its
    /// backing file name points to was when the image was created on it or first read
    /// it. Opening the image refuses another object under that name. `None` when the
    /// header area holds no record for the backing file it names now.
    #[inline]
    pub fn base_pin(&self) -> Result<Option<RemoteIdentity>> {
        super::backing_file::base_pin(self)
    }

    /// Pins the image to `identity`, the remote object its backing file names (see
    /// [`Image::base_pin`]): the record is written after the name and flushed.
    #[inline]
    pub fn set_base_pin(&self, identity: &RemoteIdentity) -> Result<()> {
        super::backing_file::set_base_pin(self, identity)
    }

    /// Checks the image's metadata without changing anything.
    #[inline]
    pub fn check(&self) -> Result<CheckReport> {
        super::check::check(self)
    }

    /// Checks the metadata and repairs it (see [`RepairMode`] and docs/design.md). On
    /// success, with no corruption left, NEED_CHECK is cleared.
    #[inline]
    pub fn repair(&mut self, mode: RepairMode) -> Result<CheckReport> {
        super::repair::repair(self, mode)
    }

    /// Walks the tables for a job that will move clusters, and hands it the free
    /// clusters it may fill: the ready ones of the free set and the leaks. Refuses an
    /// image whose check finds corruption.
    #[inline]
    pub(crate) fn layout(&self) -> Result<Layout> {
        super::layout::layout(self)
    }

    /// Calls `f(guest, file, clusters)` for every run of data clusters, in guest order,
    /// as memory holds them now, until it breaks.
    #[inline]
    pub(crate) fn data_runs(&self, f: impl FnMut(u64, u64, u64) -> ControlFlow<()>) -> Result<()> {
        super::layout::data_runs(self, f)
    }

    /// The data clusters (guest offset, file offset) whose bytes are all holes in the
    /// file now, for [`Image::free_punched`], from guest offset `from` on. At most `most`,
    /// in guest order, so that a caller goes on after the last one it got: the file is
    /// asked about holes once per extent, not once per call.
    #[inline]
    pub(crate) fn punched_clusters(&self, from: u64, most: usize) -> Result<Vec<(u64, u64)>> {
        super::layout::punched_clusters(self, from, most)
    }

    /// Gives back free clusters a job took and did not fill (see [`Image::layout`]).
    #[inline]
    pub(crate) fn give_back_clusters(&self, clusters: &[u64]) {
        super::layout::give_back_clusters(self, clusters)
    }

    /// Bytes freed while open and not reused yet.
    #[inline]
    pub fn freed_bytes(&self) -> u64 {
        super::layout::freed_bytes(self)
    }

    /// Makes every cluster freed so far ready to reuse or cut: waits for the requests
    /// that could still use them, and flushes twice (see `free_set.rs`).
    #[inline]
    pub(crate) fn settle_freed(&self) -> Result<()> {
        super::layout::settle_freed(self)
    }

    /// Starts a job that moves clusters; refused while another runs.
    #[inline]
    pub(crate) fn begin_reorganizing(&self) -> Result<Reorganizing<'_>> {
        super::relocate::begin_reorganizing(self)
    }

    /// Moves data clusters, each to space the caller owns. A cluster no longer at its
    /// expected place is left alone, and its destination reported unused.
    #[inline]
    pub(crate) fn move_clusters(&self, moves: &[ClusterMove]) -> Result<Moved> {
        super::relocate::move_clusters(self, moves)
    }

    /// Frees the data clusters of `candidates` (guest offset, file offset) whose bytes
    /// are all holes in the file (a close parked them, or an older discard only punched
    /// them): they read as zeros, as the entry that replaces them does (unallocated, or
    /// a zero cluster where a backing file would show through). Frozen as for a move, so
    /// that no write in place lands in a cluster while it is found empty and dropped.
    /// Returns how many were freed.
    #[inline]
    pub(crate) fn free_punched(&self, candidates: &[(u64, u64)]) -> Result<u64> {
        super::relocate::free_punched(self, candidates)
    }

    /// Moves the L2 table of L1 entry `l1_index` from `from` to `to` (free space of a
    /// table's size the caller owns). `false` when the table is no longer at `from`.
    #[inline]
    pub(crate) fn move_table(&self, l1_index: u64, from: u64, to: u64) -> Result<bool> {
        super::relocate::move_table(self, l1_index, from, to)
    }

    /// Fills the unallocated clusters of the run at `pos` (at most `len` bytes, and at
    /// most a megabyte plus the clusters around it, as a read would) from the backing chain, and copies
    /// the guest bytes from `pos` into `out` when given (`out` is at least as long as
    /// what is covered). Returns how many bytes from `pos` it covered, or `None` when the
    /// first cluster is no longer unallocated (someone else wrote or filled it: look it
    /// up again).
    #[inline]
    pub(crate) fn populate(
        &self,
        pos: u64,
        len: u64,
        out: Option<&mut [u8]>,
    ) -> Result<Option<u64>> {
        super::populate::populate(self, pos, len, out)
    }

    /// [`Image::populate`] for a stream: at most `most` bytes at a time (plus the
    /// clusters around), so that a server sends fewer, larger answers, and what is
    /// written starts on its way to the disk at once, so that the flush that ends the
    /// stream has little left to do.
    #[inline]
    pub(crate) fn populate_up_to(&self, pos: u64, len: u64, most: u64) -> Result<Option<u64>> {
        super::populate::populate_up_to(self, pos, len, most)
    }

    #[inline]
    pub(super) fn writable(&self, offset: u64, len: u64) -> Result<()> {
        super::io::writable(self, offset, len)
    }

    /// Reads guest bytes that this image does not hold: from the backing file, or zeros.
    #[inline]
    pub(super) fn read_unallocated(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        super::io::read_unallocated(self, buf, pos)
    }

    /// Size of the backing device, 0 without one.
    #[inline]
    pub(super) fn backing_size(&self) -> u64 {
        super::io::backing_size(self)
    }

    #[inline]
    pub(super) fn read_guest(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        super::io::read_guest(self, buf, pos)
    }

    #[inline]
    pub(super) fn write_guest(&self, buf: &[u8], pos: u64) -> Result<()> {
        super::io::write_guest(self, buf, pos)
    }

    /// Writes the start of `buf` at `pos` into newly allocated clusters. Returns how many
    /// bytes it wrote: 0 when another writer allocated the cluster first.
    #[inline]
    pub(super) fn write_allocating(&self, buf: &[u8], pos: u64) -> Result<usize> {
        super::io::write_allocating(self, buf, pos)
    }

    /// [`crate::BlockDevice::begin_write`] for writes into clusters not allocated yet:
    /// when the range lies in unallocated (or zero) clusters of one page of an existing
    /// L2 table, and the rest of those clusters may read as zeros (no backing file, a
    /// zero cluster, or whole clusters), allocates them as a write does, except that the
    /// caller writes the data; finishing maps the new clusters. `None` wherever that
    /// would wait (a claimed cluster, a closed gate) or need more (a new table, backing
    /// data to copy).
    #[inline]
    pub(super) fn begin_allocating_write(&self, pos: u64, len: u64) -> Option<PendingWrite<'_>> {
        super::io::begin_allocating_write(self, pos, len)
    }

    /// Looks up the run of guest bytes that starts at `pos`: how it is stored and how
    /// long the run is (at least 1 byte, at most `len`). A run never crosses a page of
    /// 512 L2 entries, so one lookup reads at most one page of metadata.
    #[inline]
    pub fn lookup(&self, pos: u64, len: u64) -> Result<(Mapping, u64)> {
        super::mapping::lookup(self, pos, len)
    }

    /// Flushes the file, sharing the flush with concurrent callers.
    #[inline]
    pub(super) fn flush_storage(&self) -> Result<()> {
        super::flush::flush_storage(self)
    }

    /// Makes every completed write durable. When NEED_CHECK is set, waits for the
    /// allocations in flight, flushes what they wrote, and clears it. Moves freed
    /// clusters along on their way back to allocations (see `free_set.rs`).
    #[inline]
    pub(super) fn flush_image(&self) -> Result<()> {
        super::flush::flush_image(self)
    }

    /// After a successful check: flushes the repairs, then clears NEED_CHECK.
    #[inline]
    pub(super) fn mark_checked(&self) -> Result<()> {
        super::flush::mark_checked(self)
    }

    /// At close: the freed clusters that end the file are given back to the filesystem,
    /// and those below are parked (see [`Image::park_freed`]).
    #[inline]
    pub(super) fn give_back_free_tail(&self) -> Result<()> {
        super::flush::give_back_free_tail(self)
    }

    /// Truncates the file after its last cluster in use, and moves the frontier there:
    /// freed clusters at the tail, and those of `owned` (a job's, taken out of it), go
    /// with it unpunched. Drops freed so far are made durable on the way, so that their
    /// clusters can go too. Returns the new end.
    #[inline]
    pub(crate) fn cut_free_tail(&self, owned: &mut BTreeSet<u64>) -> Result<u64> {
        super::flush::cut_free_tail(self, owned)
    }

    /// Step 1: claims the clusters of the unallocated or zero run at `pos` (at most
    /// `len` bytes) and looks again under the claim. `None` when the first cluster turned
    /// out to be data (someone else allocated it), or, with [`Wait::Never`], when another
    /// request holds one of the clusters.
    #[inline]
    pub(super) fn claim_allocation(
        &self,
        pos: u64,
        len: u64,
        wait: Wait,
    ) -> Result<Option<Allocation<'_>>> {
        super::allocation::claim_allocation(self, pos, len, wait)
    }

    /// Sets `bytes` aside (see [`super::allocator::Allocator::reserve`]). Returns where.
    #[inline]
    pub(super) fn reserve(&self, bytes: u64) -> Result<u64> {
        super::allocation::reserve(self, bytes)
    }
}
