//! How large a QED image needs to be.

use crate::block::BlockDevice;
use crate::chain::describe;
use crate::error::Result;
use crate::format::Geometry;

/// Sizes of a QED image holding some contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// File size needed for the data (zero runs are not stored).
    pub required: u64,
    /// File size with every cluster and table allocated.
    pub fully_allocated: u64,
}

/// Measures a QED image of `size` bytes with `geometry`, holding `src`'s contents (or
/// nothing). Runs the source reports as zero are not counted.
pub fn measure(src: Option<&dyn BlockDevice>, size: u64, geometry: Geometry) -> Result<Measure> {
    let cs = geometry.cluster_size();
    let fixed = cs + geometry.table_bytes();
    let all_tables = geometry.l1_entries_for(size) * geometry.table_bytes();
    let fully_allocated = fixed + all_tables + geometry.clusters_for(size) * cs;
    let mut clusters = 0u64;
    let mut tables = 0u64;
    if let Some(src) = src {
        let end = size.min(src.size());
        let (mut last_cluster, mut last_table) = (None, None);
        let mut pos = 0;
        while pos < end {
            let e = describe(src, pos, end - pos, 0)?;
            if !e.zero {
                let first = pos / cs;
                let last = (pos + e.length - 1) / cs;
                let from = match last_cluster {
                    Some(l) if l >= first => l + 1,
                    _ => first,
                };
                clusters += (last + 1).saturating_sub(from);
                last_cluster = Some(last);
                let (t0, t1) = (
                    geometry.l1_index(pos),
                    geometry.l1_index(pos + e.length - 1),
                );
                let tfrom = match last_table {
                    Some(t) if t >= t0 => t + 1,
                    _ => t0,
                };
                tables += (t1 + 1).saturating_sub(tfrom);
                last_table = Some(t1);
            }
            pos += e.length;
        }
    }
    Ok(Measure {
        required: fixed + tables * geometry.table_bytes() + clusters * cs,
        fully_allocated,
    })
}
