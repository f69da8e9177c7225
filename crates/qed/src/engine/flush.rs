//! Flushes: of the file alone (grouped between concurrent callers), and of the image,
//! which writes the dirty table entries back first and clears NEED_CHECK when it can.

use super::free_set::FlushStage;
use super::image::Image;
use super::mapping::Mapping;
use crate::error::{IoContext, Result};
use std::collections::BTreeSet;

/// Flushes the file, sharing the flush with concurrent callers.
pub(super) fn flush_storage(image: &Image) -> Result<()> {
    image
        .flushes
        .flush(|| image.storage.flush())
        .context(|| format!("flushing {}", image.name))
}

/// Makes every completed write durable. When NEED_CHECK is set, waits for the
/// allocations in flight, flushes what they wrote, and clears it. Moves freed
/// clusters along on their way back to allocations (see `free_set.rs`).
pub(super) fn flush_image(image: &Image) -> Result<()> {
    if image.read_only {
        return Ok(());
    }
    let mut stage = image.alloc.begin_flush();
    let result = punch_settling(image, &mut stage).and_then(|()| flush_metadata_and_data(image));
    image.alloc.end_flush(stage, result.is_ok());
    result
}

/// Punches the freed clusters this flush will make ready, so that they read as
/// zeros, durably, before anyone gets them.
fn punch_settling(image: &Image, stage: &mut FlushStage) -> Result<()> {
    for f in stage.settling.iter_mut().filter(|f| !f.punched) {
        image.storage.zero_range(f.at, f.len).context(|| {
            format!(
                "releasing {} freed bytes at {:#x} of {}",
                f.len, f.at, image.name
            )
        })?;
        f.punched = true;
    }
    Ok(())
}

fn flush_metadata_and_data(image: &Image) -> Result<()> {
    if !image.header.get().needs_check() || image.header.unchecked() {
        image.write_back_tables()?;
        return flush_storage(image);
    }
    let _exclusive = image.alloc.gate_exclusive();
    image.write_back_tables()?;
    flush_storage(image)?;
    image
        .header
        .clear_need_check(&*image.storage, &image.name, || flush_storage(image))
}

/// After a successful check: flushes the repairs, then clears NEED_CHECK.
pub(super) fn mark_checked(image: &Image) -> Result<()> {
    image.header.checked();
    if !image.header.get().needs_check() {
        return Ok(());
    }
    flush_storage(image)?;
    image
        .header
        .clear_need_check(&*image.storage, &image.name, || flush_storage(image))
}

/// At close: the freed clusters that end the file are given back to the filesystem,
/// and those below are parked (see [`Image::park_freed`]).
pub(super) fn give_back_free_tail(image: &Image) -> Result<()> {
    if image.alloc.freed_bytes() == 0 {
        return Ok(());
    }
    // The tail goes first, unpunched; what is left below it is punched on its way.
    cut_free_tail(image, &mut BTreeSet::new())?;
    image.settle_freed()?;
    park_freed(image)
}

/// Points the entries discards dropped back at the clusters they named, where the
/// guest cluster still reads as zeros without them and the cluster was not reused.
/// Those clusters were punched, so the guest reads what it read; and the format has
/// no free list, so a cluster left unreferenced would be a leak to every checker,
/// QEMU's included. Their blocks stay given back to the filesystem; the file's
/// length, until a compaction. (Moved clusters' old places have no entry to go back
/// to, and a job leaves none below the end.)
fn park_freed(image: &Image) -> Result<()> {
    let runs = image.alloc.take_to_park();
    if runs.is_empty() {
        return Ok(());
    }
    let cs = image.geometry.cluster_size();
    let backing_end = image.backing_size();
    {
        let _gate = image.alloc.gate_shared();
        for (at, guest, len) in runs {
            for i in 0..len / cs {
                let g = guest + i * cs;
                let zeros = match image.lookup(g, cs)?.0 {
                    Mapping::Zero => true,
                    Mapping::Unallocated => g >= backing_end,
                    Mapping::Data(_) => false,
                };
                if zeros {
                    image.set_l2_entries(g, 1, true, |_| at + i * cs)?;
                }
            }
        }
    }
    flush_image(image)
}

/// Truncates the file after its last cluster in use, and moves the frontier there:
/// freed clusters at the tail, and those of `owned` (a job's, taken out of it), go
/// with it unpunched. Drops freed so far are made durable on the way, so that their
/// clusters can go too. Returns the new end.
pub(super) fn cut_free_tail(image: &Image, owned: &mut BTreeSet<u64>) -> Result<u64> {
    image.alloc.synchronize();
    cut_free_tail_now(image, owned)?;
    flush_image(image)?;
    image.alloc.synchronize();
    cut_free_tail_now(image, owned)
}

/// Truncates the file after its last cluster that is neither free (ready, or durably
/// dropped and past its epoch) nor in `owned`.
fn cut_free_tail_now(image: &Image, owned: &mut BTreeSet<u64>) -> Result<u64> {
    image.alloc.cut_free_tail(
        &*image.storage,
        &image.name,
        image.geometry.cluster_size(),
        owned,
        || flush_storage(image),
    )
}
