//! One QED image over a storage, handed its backing device. Built in three floors, each
//! using only the floors below it:
//!
//! Parts, each owning its state behind its methods (no other file touches a field):
//! - `allocator.rs`: which file clusters are whose: the frontier (`frontier.rs`),
//!   claims on guest clusters and L1 entries (`claims.rs`), the allocation gate
//!   (`gate.rs`), epochs (`epochs.rs`), the free set (`free_set.rs`) and the freeze of
//!   clusters a job moves;
//! - `tables.rs`: the L1 table (`l1.rs`), the cache of L2 entries (`l2cache.rs`),
//!   their write-back, new L2 tables, chunked table I/O;
//! - `header.rs`: the header in memory and the NEED_CHECK protocol; `header_area.rs`:
//!   the backing name and the remote base's pin after it;
//! - `layers.rs`: the backing file, the layer of its chain reads go through to, the
//!   name the header stores; `flush_group.rs`: concurrent flushes served by one.
//!
//! The image over them:
//! - `image.rs`: the [`Image`] type (its parts, the file and what names it), opening
//!   (the open gate), closing, and the few methods that combine parts (setting L2
//!   entries: the tables, with a table claim and space from the allocator);
//! - `facade.rs`: every other method of `Image`, each delegating to an operation;
//!   `device.rs`: the image as a `BlockDevice` (block status, extents for io_uring).
//!
//! Operations, functions over the image's parts, one concept a file:
//! - `allocation.rs`: the one allocation protocol every write path uses;
//! - `mapping.rs`: where a guest range lives; `io.rs`: reads and writes;
//!   `zeroes.rs`: zero writes and discards; `flush.rs`: flushes, clearing NEED_CHECK,
//!   giving freed clusters back at close;
//! - `populate.rs`: clusters filled from the backing chain (copy-on-read, streaming);
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
