//! Read, write and create QED (QEMU Enhanced Disk) images, byte-compatible with QEMU.
//!
//! An [`Image`] is one QED image over a [`Storage`]; it is a [`BlockDevice`], as are raw
//! files ([`RawDevice`]), qcow2 images ([`Qcow2Device`]) and new qcow2 images
//! ([`Qcow2Writer`], made by [`create_qcow2`]). [`open_device`]
//! and [`Image::open`] open a device by name (a path, or read-only an http or https URL
//! read through [`HttpStorage`] or an s3 URL read through [`S3Storage`]) with its
//! backing chain, taking on each file the locks QEMU takes, so that QEMU's processes
//! and other `qed` processes see each other's use of it ([`OpenOptions::locking`],
//! [`OpenOptions::force_share`]). Whole-image jobs
//! ([`check`](Image::check), [`convert`], [`compare`], [`commit`], [`rebase`],
//! [`measure`], [`map`], [`bench()`]) work on any device and report progress through a
//! callback.
//!
//! Inside, the crate is layered from the bytes up, each layer using only those below
//! it: `format` (on-disk types), `storage` (the bytes), `block` (what a disk is),
//! `engine` (one QED image), `devices` (raw, qcow2), `chain` (opening by name, backing
//! chains) and `ops` (whole-image jobs).
//!
//! ```no_run
//! use qed::{BlockDevice, CreateOptions, Image, OpenOptions};
//!
//! Image::create("disk.qed", &CreateOptions::new(1 << 30))?;
//! let image = Image::open("disk.qed", &OpenOptions::default())?;
//! image.write_at(b"hello", 4096)?;
//! let mut buf = [0u8; 5];
//! image.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"hello");
//! image.close()?;
//! # Ok::<(), qed::Error>(())
//! ```

#![warn(missing_docs)]

mod block;
mod chain;
mod devices;
mod engine;
mod error;
mod format;
mod ops;
#[cfg(target_os = "linux")]
mod ring;
mod storage;
mod warnings;

pub use block::{
    BlockDevice, BlockStatus, DirectExtent, DirectRead, DiscardMode, Format, PendingWrite,
};
pub use chain::{
    chain_contains, create_qcow2, describe, for_each_run, is_remote_name, known_zero, map,
    open_device, probe_format, probe_format_at, qcow2_facts_at, remote_identity_at,
    resolve_backing_path, MapEntry, OpenOptions, MAX_CHAIN_DEPTH,
};
#[cfg(feature = "qcow2")]
pub use devices::Qcow2Device;
pub use devices::{
    Qcow2CreateOptions, Qcow2Facts, Qcow2Writer, RawDevice, QCOW2_MAX_CLUSTER, QCOW2_MIN_CLUSTER,
};
pub use engine::{
    Backing, CheckReport, Corruption, CreateOptions, Image, ImageOptions, Mapping, NewBacking,
    OpeningImage, RepairMode, DEFAULT_L2_CACHE_BYTES,
};
pub use error::{Error, Result};
pub use format::{features, Geometry, Header, L2Entry};
pub use ops::{
    bench, commit, commit_into, compact, compare, convert, convert_in_place, defrag, measure,
    no_progress, rebase, stream, stream_base, BenchParams, ConvertOptions, Difference, Engine,
    InPlaceOptions, InPlacePlan, Measure, Progress, Reorganization, ReorganizeEnd,
    ReorganizeOptions, SequentialImage, SequentialOptions, StreamEnd, StreamOptions,
};
#[cfg(target_os = "linux")]
pub use ring::{DirectDone, DirectEvent, DirectQueue, Waker, WorkerPool};
pub use storage::{
    clear_host_cache, host_cache_info, part_size_for, prune_host_cache, AlignedBuf, BlockHold,
    CachedObject, FileStorage, HostCacheInfo, HostCacheOptions, HttpStorage, LockMode,
    MemoryStorage, PruneReport, RemoteIdentity, RemoteOptions, RemoteReport, S3Config,
    S3Credentials, S3Storage, S3Upload, Storage, MAX_CHUNK_SIZE, MAX_PARTS, MAX_PART_SIZE,
    MIN_CHUNK_SIZE, MIN_PART_SIZE,
};
pub use warnings::set_warning_handler;
