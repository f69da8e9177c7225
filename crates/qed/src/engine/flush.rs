//! Flushes: of the file alone (grouped between concurrent callers), and of the image,
//! which writes the dirty table entries back first and clears NEED_CHECK when it can.

use super::image::Image;
use crate::error::{IoContext, Result};

impl Image {
    /// Flushes the file, sharing the flush with concurrent callers.
    pub(super) fn flush_storage(&self) -> Result<()> {
        self.flushes
            .flush(|| self.storage.flush())
            .context(|| format!("flushing {}", self.name))
    }

    /// Makes every completed write durable. When NEED_CHECK is set, waits for the
    /// allocations in flight, flushes what they wrote, and clears it.
    pub(super) fn flush_image(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if !self.header.get().needs_check() || self.header.unchecked() {
            self.write_back_tables()?;
            return self.flush_storage();
        }
        let _exclusive = self.gate.exclusive();
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
