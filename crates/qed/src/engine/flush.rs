//! Flushes: of the file alone (grouped between concurrent callers), and of the image,
//! which writes the dirty table entries back first and clears NEED_CHECK when it can.

use super::free_set::FlushStage;
use super::image::Image;
use super::mapping::Mapping;
use crate::error::{IoContext, Result};
use std::collections::BTreeSet;

impl Image {
    /// Flushes the file, sharing the flush with concurrent callers.
    pub(super) fn flush_storage(&self) -> Result<()> {
        self.flushes
            .flush(|| self.storage.flush())
            .context(|| format!("flushing {}", self.name))
    }

    /// Makes every completed write durable. When NEED_CHECK is set, waits for the
    /// allocations in flight, flushes what they wrote, and clears it. Moves freed
    /// clusters along on their way back to allocations (see `free_set.rs`).
    pub(super) fn flush_image(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut stage = self.alloc.begin_flush();
        let result = self
            .punch_settling(&mut stage)
            .and_then(|()| self.flush_metadata_and_data());
        self.alloc.end_flush(stage, result.is_ok());
        result
    }

    /// Punches the freed clusters this flush will make ready, so that they read as
    /// zeros, durably, before anyone gets them.
    fn punch_settling(&self, stage: &mut FlushStage) -> Result<()> {
        for f in stage.settling.iter_mut().filter(|f| !f.punched) {
            self.storage.zero_range(f.at, f.len).context(|| {
                format!(
                    "releasing {} freed bytes at {:#x} of {}",
                    f.len, f.at, self.name
                )
            })?;
            f.punched = true;
        }
        Ok(())
    }

    fn flush_metadata_and_data(&self) -> Result<()> {
        if !self.header.get().needs_check() || self.header.unchecked() {
            self.write_back_tables()?;
            return self.flush_storage();
        }
        let _exclusive = self.alloc.gate_exclusive();
        self.write_back_tables()?;
        self.flush_storage()?;
        self.header
            .clear_need_check(&*self.storage, &self.name, || self.flush_storage())
    }

    /// After a successful check: flushes the repairs, then clears NEED_CHECK.
    pub(super) fn mark_checked(&self) -> Result<()> {
        self.header.checked();
        if !self.header.get().needs_check() {
            return Ok(());
        }
        self.flush_storage()?;
        self.header
            .clear_need_check(&*self.storage, &self.name, || self.flush_storage())
    }
}

impl Image {
    /// At close: the freed clusters that end the file are given back to the filesystem,
    /// and those below are parked (see [`Image::park_freed`]).
    pub(super) fn give_back_free_tail(&self) -> Result<()> {
        if self.alloc.freed_bytes() == 0 {
            return Ok(());
        }
        // The tail goes first, unpunched; what is left below it is punched on its way.
        self.cut_free_tail(&mut BTreeSet::new())?;
        self.settle_freed()?;
        self.park_freed()
    }

    /// Points the entries discards dropped back at the clusters they named, where the
    /// guest cluster still reads as zeros without them and the cluster was not reused.
    /// Those clusters were punched, so the guest reads what it read; and the format has
    /// no free list, so a cluster left unreferenced would be a leak to every checker,
    /// QEMU's included. Their blocks stay given back to the filesystem; the file's
    /// length, until a compaction. (Moved clusters' old places have no entry to go back
    /// to, and a job leaves none below the end.)
    fn park_freed(&self) -> Result<()> {
        let runs = self.alloc.take_to_park();
        if runs.is_empty() {
            return Ok(());
        }
        let cs = self.geometry.cluster_size();
        let backing_end = self.backing_size();
        {
            let _gate = self.alloc.gate_shared();
            for (at, guest, len) in runs {
                for i in 0..len / cs {
                    let g = guest + i * cs;
                    let zeros = match self.lookup(g, cs)?.0 {
                        Mapping::Zero => true,
                        Mapping::Unallocated => g >= backing_end,
                        Mapping::Data(_) => false,
                    };
                    if zeros {
                        self.set_l2_entries(g, 1, true, |_| at + i * cs)?;
                    }
                }
            }
        }
        self.flush_image()
    }

    /// Truncates the file after its last cluster in use, and moves the frontier there:
    /// freed clusters at the tail, and those of `owned` (a job's, taken out of it), go
    /// with it unpunched. Drops freed so far are made durable on the way, so that their
    /// clusters can go too. Returns the new end.
    pub(crate) fn cut_free_tail(&self, owned: &mut BTreeSet<u64>) -> Result<u64> {
        self.alloc.synchronize();
        self.cut_free_tail_now(owned)?;
        self.flush_image()?;
        self.alloc.synchronize();
        self.cut_free_tail_now(owned)
    }

    /// Truncates the file after its last cluster that is neither free (ready, or durably
    /// dropped and past its epoch) nor in `owned`.
    fn cut_free_tail_now(&self, owned: &mut BTreeSet<u64>) -> Result<u64> {
        self.alloc.cut_free_tail(
            &*self.storage,
            &self.name,
            self.geometry.cluster_size(),
            owned,
            || self.flush_storage(),
        )
    }
}
