//! What `qed convert` was asked, parsed and checked: shared by the copy into a file
//! (`convert`) and the upload to S3 (`publish`).

use crate::geometry::CreateGeometry;
use qed::Format;
use std::path::PathBuf;

/// The arguments, parsed and checked against each other: everything that can be refused
/// without looking at a file is refused here.
pub(super) struct Plan {
    pub(super) src: PathBuf,
    /// `None` probes.
    pub(super) src_format: Option<Format>,
    pub(super) dst: PathBuf,
    /// qed, qcow2 or raw.
    pub(super) dst_format: Format,
    /// `-n`: the destination exists and is written into.
    pub(super) no_create: bool,
    /// For a new qed or qcow2 destination; empty otherwise.
    pub(super) geometry: CreateGeometry,
    /// `-B`.
    pub(super) backing: Option<String>,
    /// `-F`: `None` probes.
    pub(super) backing_format: Option<Format>,
    pub(super) sparse_size: u64,
    /// `--target-is-zero`: the existing destination reads as zeros.
    pub(super) target_is_zero: bool,
    /// `-t none`: O_DIRECT on the destination.
    pub(super) direct: bool,
    /// `-t unsafe`: the destination is never flushed.
    pub(super) no_flush: bool,
    pub(super) progress: bool,
    pub(super) remote: crate::remote::RemoteArgs,
    /// `-U`: the source is read without waiting for writers.
    pub(super) share: crate::share::ShareArgs,
    /// `--part-size`: of an upload to S3.
    pub(super) part_size: Option<u64>,
}
