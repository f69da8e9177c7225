//! One QED image over a storage, handed its backing device: the header and the
//! NEED_CHECK protocol, the L1 table, a bounded L2 cache, the allocation frontier, the
//! allocation protocol, the check and its repairs. One concept a file:
//!
//! - `image.rs`: the [`Image`] type, opening (the open gate) and closing;
//! - `header.rs`: the header in memory and the NEED_CHECK protocol; `header_area.rs`:
//!   the backing name and the remote base's pin after it;
//! - `l1.rs`, `l2cache.rs`: the tables in memory; `tables.rs`: changing them;
//! - `frontier.rs`: where new clusters go, the file grown ahead of it;
//! - `claims.rs`, `gate.rs`, `flush_group.rs`: what concurrent requests wait on;
//! - `allocation.rs`: the one allocation protocol every write path uses;
//! - `mapping.rs`: where a guest range lives; `io.rs`, `zeroes.rs`, `flush.rs`,
//!   `device.rs`: the image as a block device;
//! - `populate.rs`: clusters filled from the backing chain (copy-on-read, streaming);
//! - `epochs.rs`, `free_set.rs`: grace periods for unmapped clusters, and the clusters
//!   a discard or a move freed on their way back to allocations;
//! - `relocate.rs`, `layout.rs`: moving clusters while the image is in use, and where
//!   everything lies for a job that moves them;
//! - `check.rs`, `repair.rs`, `report.rs`: consistency check, repairs, leak
//!   reclaiming, and what they report;
//! - `resize.rs`, `backing_file.rs`, `create.rs`: whole-image changes (growth that
//!   reads as zeros over a backing file, the backing name and the remote base's pin)
//!   and new images.

mod allocation;
mod allocator;
mod backing_file;
mod check;
mod claims;
mod create;
mod device;
mod epochs;
mod facade;
mod flush;
mod flush_group;
mod free_set;
mod frontier;
mod gate;
mod header;
mod header_area;
mod image;
mod io;
mod l1;
mod l2cache;
mod layers;
mod layout;
mod mapping;
mod populate;
mod relocate;
mod repair;
mod report;
mod resize;
mod tables;
mod zeroes;

pub use backing_file::NewBacking;
pub use create::CreateOptions;
pub use image::{Image, ImageOptions, OpeningImage, DEFAULT_L2_CACHE_BYTES};
pub use layers::Backing;
pub(crate) use layout::Layout;
pub use mapping::Mapping;
pub(crate) use relocate::{ClusterMove, Reorganizing};
pub use report::{CheckReport, Corruption, RepairMode};
