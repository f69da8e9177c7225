//! The image as a [`BlockDevice`].

use super::image::Image;
use super::mapping::Mapping;
use crate::block::{
    check_range, BlockDevice, BlockStatus, DirectExtent, DirectRead, Format, PendingWrite,
};
use crate::error::Result;

fn status(image: &Image, pos: u64, len: u64) -> Result<BlockStatus> {
    check_range(pos, len, image.size())?;
    let (mapping, n) = image.lookup(pos, len)?;
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
            zero: !image.backing_present(),
            offset: None,
        },
    })
}

impl BlockDevice for Image {
    fn release_file_locks(&self) {
        self.storage.release_locks()
    }

    fn size(&self) -> u64 {
        self.header.get().image_size
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
        super::zeroes::write_zeroes_guest(self, offset, len)
    }

    /// Fast unless part of the range is a partial cluster over backing data, which
    /// allocates a cluster and copies the rest of it from the backing file.
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> Result<bool> {
        check_range(offset, len, self.size())?;
        super::zeroes::zero_walk(self, offset, len, false)
    }

    /// Every cluster wholly inside the range reads as zeros afterwards: a data cluster is
    /// unmapped (a zero cluster where a backing file lies below) and its space freed for
    /// reuse; an unallocated cluster over a backing file becomes a zero cluster, so the
    /// backing file never shows through what the guest discarded (as with qcow2).
    /// Partial clusters are left as they are. (QEMU ignores discards on QED images.)
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        super::zeroes::discard_guest(self, offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.flush_image()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        status(self, offset, len)
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing_device()
    }

    fn remote_identity(&self) -> Option<crate::storage::RemoteIdentity> {
        self.storage.remote_identity()
    }

    fn begin_read(&self, offset: u64, len: u64) -> Option<DirectRead<'_>> {
        if check_range(offset, len, self.size()).is_err() {
            return None;
        }
        // Held until the caller's read completes: a cluster moved or freed meanwhile
        // keeps its bytes until then.
        let inside = self.alloc.enter();
        match self.lookup(offset, len).ok()? {
            (Mapping::Data(off), n) if n >= len => {
                // Per range: a remote base's bytes are in a file only where its host
                // cache has them.
                let span = self.storage.direct_span(off, len)?;
                Some(DirectRead::held(
                    DirectExtent {
                        fd: span.fd,
                        offset: span.offset,
                        align: span.align,
                    },
                    (inside, span.keep),
                ))
            }
            // Reads the backing file supplies whole come from there.
            // (Not with copy-on-read, whose reads must go through the image.)
            (Mapping::Unallocated, n) if n >= len && !self.copy_on_read => {
                drop(inside);
                self.backing_device()?.begin_read(offset, len)
            }
            _ => None,
        }
    }

    fn begin_write(&self, offset: u64, len: u64) -> Option<PendingWrite<'_>> {
        if self.read_only || len == 0 || check_range(offset, len, self.size()).is_err() {
            return None;
        }
        let (fd, align) = self.storage.direct_fd()?;
        let inside = self.alloc.enter();
        match self.lookup(offset, len).ok()? {
            (Mapping::Data(off), n) if n >= len && !self.is_frozen(offset, len) => {
                let hold = self.storage.try_hold_blocks(off, len)?;
                let extent = DirectExtent {
                    fd,
                    offset: off,
                    align,
                };
                Some(PendingWrite::new(extent, 0..0, move |_| {
                    drop(hold);
                    drop(inside);
                    Ok(())
                }))
            }
            _ => {
                drop(inside);
                self.begin_allocating_write(offset, len)
            }
        }
    }

    fn write_claim(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if self.read_only || len == 0 || check_range(offset, len, self.size()).is_err() {
            return 0..0;
        }
        match self.lookup(offset, len) {
            Ok((Mapping::Data(_), n)) if n >= len => 0..0,
            _ => {
                let cs = self.geometry.cluster_size();
                self.geometry.cluster_start(offset)..(offset + len).next_multiple_of(cs)
            }
        }
    }
}
