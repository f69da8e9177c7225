//! A raw file as the source of a conversion: every guest cluster is the file cluster at
//! the same offset.

use super::entries::{Entry, GuestTables, SourceFacts};
use crate::error::{Error, IoContext, Result};
use crate::storage::Storage;

/// An opened raw source.
pub(super) struct RawSource {
    facts: SourceFacts,
}

impl RawSource {
    /// A raw file in clusters of `cluster_size`. Its length is its virtual size, which
    /// QED needs to be a multiple of 512.
    pub fn open(storage: &dyn Storage, name: &str, cluster_size: u64) -> Result<Self> {
        let file_len = storage
            .len()
            .context(|| format!("reading the length of {name}"))?;
        if file_len == 0 || file_len % 512 != 0 {
            return Err(Error::invalid_argument(format!(
                "{name}: a raw file of {file_len} bytes cannot become a QED image in place: \
                 its length (the virtual size) must be a non-zero multiple of 512"
            )));
        }
        Ok(Self {
            facts: SourceFacts {
                name: name.to_string(),
                cluster_size,
                virtual_size: file_len,
                file_len,
                backing: None,
                header_used: 0,
                zstd: false,
            },
        })
    }
}

impl GuestTables for RawSource {
    fn facts(&self) -> &SourceFacts {
        &self.facts
    }

    fn read_run(&self, first: u64, out: &mut [Entry]) -> Result<bool> {
        let clusters = self.facts.virtual_size.div_ceil(self.facts.cluster_size);
        for (i, e) in out.iter_mut().enumerate() {
            let c = first + i as u64;
            *e = if c < clusters {
                Entry::Data(c * self.facts.cluster_size)
            } else {
                Entry::Unallocated
            };
        }
        Ok(first < clusters)
    }

    fn old_metadata(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
}
