//! One QED image over a storage: header and L1 in memory, a bounded L2 cache, the
//! allocation frontier and the NEED_CHECK protocol.

mod admin;
mod alloc;
mod check;
mod create;
mod io;
mod l2cache;
mod mapping;
mod repair;

pub use admin::NewBacking;
pub use check::{CheckReport, Corruption, RepairMode};
pub use create::CreateOptions;
pub use mapping::Mapping;

use crate::device::{self, BlockDevice, Format, OpenOptions};
use crate::error::{Error, IoContext, Result};
use crate::format::geometry::SECTOR_SIZE;
use crate::format::header::{features, table_offset_is_valid, HEADER_LEN};
use crate::format::table::{decode_entries, encode_entries};
use crate::format::{Geometry, Header};
use crate::storage::{FileStorage, Storage};
use l2cache::L2Cache;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

/// Default bound on cached L2 entries: 16 MiB, which maps 256 GiB of guest space with
/// 64 KiB clusters.
pub const DEFAULT_L2_CACHE_BYTES: usize = 16 << 20;

/// Entries per 512-byte sector of a table.
const ENTRIES_PER_SECTOR: u64 = SECTOR_SIZE / 8;

/// The backing file of an image, as named in its header and as opened.
#[derive(Debug)]
pub struct Backing {
    /// The name stored in the header.
    pub name: String,
    /// The name resolved against the image's directory.
    pub path: PathBuf,
    /// The declared format: `Some(Raw)` when NO_PROBE is set, else `None` (probed).
    pub declared_format: Option<Format>,
    /// The opened device (absent when opened with `no_backing`).
    pub device: Option<Box<dyn BlockDevice>>,
}

/// The end of the file, grown only under this lock so that it only ever grows.
#[derive(Debug)]
struct GrowState {
    /// Whether the file still has a partial cluster past the frontier to drop.
    trailing_garbage: bool,
}

/// An open QED image. `Send + Sync`; every I/O method takes `&self`.
#[derive(Debug)]
pub struct Image {
    storage: Box<dyn Storage>,
    geometry: Geometry,
    header: RwLock<Header>,
    backing: Option<Backing>,
    read_only: bool,
    name: String,
    /// First byte past the header area: data and tables live at or after it.
    data_start: u64,
    /// L1 entries covering the image size, rounded up to whole sectors.
    l1: RwLock<Vec<u64>>,
    l2: L2Cache,
    /// End of the last whole cluster of the file: where the next allocation goes.
    frontier: AtomicU64,
    grow: Mutex<GrowState>,
    /// Guest clusters and L1 entries being allocated.
    claims: alloc::Claims,
    /// Allocations share it; NEED_CHECK clearing and whole-image walks own it.
    gate: alloc::Gate,
    /// Serializes setting NEED_CHECK.
    need_check_lock: Mutex<()>,
    /// Serializes L1 sector writes (several L1 entries share a sector).
    l1_lock: Mutex<()>,
    /// Coalesces concurrent flushes.
    flushes: alloc::FlushGroup,
    /// What the check run at open (NEED_CHECK set, read-write) found and fixed.
    open_repair: Option<CheckReport>,
    closed: std::sync::atomic::AtomicBool,
}

impl Image {
    /// Opens an image file, with its backing chain unless `opts.no_backing`.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let canonical = path
            .canonicalize()
            .context(|| format!("opening {}", path.display()))?;
        let storage = FileStorage::open_with(path, opts.read_only, opts.direct)
            .context(|| format!("opening {}", path.display()))?;
        Self::open_storage_in_chain(Box::new(storage), path, opts, &mut vec![canonical])
    }

    /// Opens an image held in `storage`. `path` names it in messages and anchors
    /// relative backing file names.
    pub fn open_storage(
        storage: Box<dyn Storage>,
        path: &Path,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let mut chain = path.canonicalize().map(|p| vec![p]).unwrap_or_default();
        Self::open_storage_in_chain(storage, path, opts, &mut chain)
    }

    pub(crate) fn open_storage_in_chain(
        storage: Box<dyn Storage>,
        path: &Path,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        let name = path.to_string_lossy().into_owned();
        let file_len = storage
            .len()
            .context(|| format!("reading the size of {name}"))?;
        if file_len < HEADER_LEN as u64 {
            return Err(Error::invalid_header(
                "file size",
                file_len,
                "too small to hold a QED header (64 bytes)",
            ));
        }
        let mut hb = [0u8; HEADER_LEN];
        storage
            .read_at(&mut hb, 0)
            .context(|| format!("reading the header of {name}"))?;
        let mut header = Header::decode(&hb)?;
        let geometry = header.validate(file_len)?;

        let backing = if header.has_backing_file() {
            Some(Self::open_backing(&*storage, &header, path, opts, chain)?)
        } else {
            None
        };

        let frontier = geometry.cluster_start(file_len);
        let l1_len = geometry
            .l1_entries_for(header.image_size)
            .next_multiple_of(ENTRIES_PER_SECTOR)
            .min(geometry.entries_per_table());
        let mut l1_bytes = vec![0u8; (l1_len * 8) as usize];
        storage
            .read_at(&mut l1_bytes, header.l1_table_offset)
            .context(|| format!("reading the L1 table of {name}"))?;
        let mut l1 = vec![0u64; l1_len as usize];
        decode_entries(&l1_bytes, &mut l1);

        let unknown_autoclear = header.autoclear_features & !features::KNOWN_AUTOCLEAR;
        if unknown_autoclear != 0 && !opts.read_only {
            header.autoclear_features &= features::KNOWN_AUTOCLEAR;
            write_header_to(&*storage, &header).context(|| {
                format!("clearing unknown autoclear bits {unknown_autoclear:#x} in {name}")
            })?;
        }

        let needs_check = header.needs_check();
        let data_start = header.header_bytes();
        let mut image = Image {
            storage,
            geometry,
            data_start,
            header: RwLock::new(header),
            backing,
            read_only: opts.read_only,
            name,
            l1: RwLock::new(l1),
            l2: L2Cache::new(opts.l2_cache_bytes),
            frontier: AtomicU64::new(frontier),
            grow: Mutex::new(GrowState {
                trailing_garbage: file_len != frontier,
            }),
            claims: alloc::Claims::default(),
            gate: alloc::Gate::default(),
            need_check_lock: Mutex::new(()),
            l1_lock: Mutex::new(()),
            flushes: alloc::FlushGroup::default(),
            open_repair: None,
            closed: false.into(),
        };
        if needs_check && !opts.read_only && opts.repair_on_open {
            // Until the check succeeds, dropping the image must not close it cleanly:
            // that would clear NEED_CHECK and let the next open skip the check.
            image.closed.store(true, Ordering::Release);
            let report = image.repair(RepairMode::All)?;
            if report.corruptions_remaining() > 0 {
                return Err(Error::Unsupported(format!(
                    "{}: NEED_CHECK is set and the check left {} corruptions; \
                     run 'qed check -r all' and inspect the image",
                    image.name,
                    report.corruptions_remaining()
                )));
            }
            if report.check_errors > 0 {
                return Err(Error::Unsupported(format!(
                    "{}: NEED_CHECK is set and the check could not finish ({} errors); \
                     run 'qed check -r all' and inspect the image",
                    image.name, report.check_errors
                )));
            }
            image.closed.store(false, Ordering::Release);
            image.open_repair = Some(report);
        }
        Ok(image)
    }

    fn open_backing(
        storage: &dyn Storage,
        header: &Header,
        path: &Path,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Backing> {
        let mut raw = vec![0u8; header.backing_filename_size as usize];
        storage
            .read_at(&mut raw, header.backing_filename_offset.into())
            .context(|| "reading the backing file name".to_string())?;
        let name = String::from_utf8(raw).map_err(|_| {
            Error::invalid_header(
                "backing_filename_offset",
                header.backing_filename_offset.into(),
                "the backing file name is not valid UTF-8",
            )
        })?;
        let declared_format = header.backing_is_raw().then_some(Format::Raw);
        let resolved = device::resolve_backing_path(path, &name);
        let device =
            if opts.no_backing {
                None
            } else {
                let bopts = OpenOptions {
                    read_only: true,
                    ..opts.clone()
                };
                let dev = device::open_in_chain(&resolved, declared_format, &bopts, chain)
                    .map_err(|e| Error::Backing {
                        path: resolved.clone(),
                        reason: e.to_string(),
                    })?;
                Some(dev)
            };
        Ok(Backing {
            name,
            path: resolved,
            declared_format,
            device,
        })
    }

    /// Creates an image file from `opts`, truncating any file at `path`.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
        let path = path.as_ref();
        let storage =
            FileStorage::create(path).context(|| format!("creating {}", path.display()))?;
        create::create_on(&storage, opts)?;
        storage
            .flush()
            .context(|| format!("flushing {}", path.display()))
    }

    /// Writes a new image into empty `storage`.
    pub fn create_on(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
        create::create_on(storage, opts)
    }

    /// The image's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.header_read().clone()
    }

    /// The backing file, if the header names one.
    pub fn backing_file(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    /// What the consistency check run at open found and repaired, when NEED_CHECK was set.
    pub fn open_repair(&self) -> Option<&CheckReport> {
        self.open_repair.as_ref()
    }

    /// The underlying storage.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// Flushes and clears NEED_CHECK. Dropping the image does the same, ignoring errors.
    pub fn close(self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) || self.read_only {
            return Ok(());
        }
        self.flush_image()
    }

    fn header_read(&self) -> RwLockReadGuard<'_, Header> {
        self.header.read().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_grow(&self) -> MutexGuard<'_, GrowState> {
        self.grow.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn file_clusters_end(&self) -> u64 {
        self.frontier.load(Ordering::Acquire)
    }

    /// Rewrites the header, preserving the rest of its sector as QEMU does.
    fn write_header(&self, header: &Header) -> Result<()> {
        write_header_to(&*self.storage, header)
            .context(|| format!("writing the header of {}", self.name))
    }

    /// Checks that an L2 table offset read from the L1 table is usable.
    fn check_l2_offset(&self, l1_index: u64, offset: u64) -> Result<()> {
        let header = self.header_read();
        if table_offset_is_valid(&header, &self.geometry, self.file_clusters_end(), offset) {
            Ok(())
        } else {
            Err(Error::CorruptTable {
                table: "L1".into(),
                index: l1_index,
                value: offset,
                reason:
                    "L2 table offset is misaligned, inside the header or past the end of the file",
            })
        }
    }

    /// Encodes the sectors of L1 holding entries `[first, first + n)`, with `update`
    /// applied, and writes them.
    fn write_l1_sectors(&self, l1: &[u64], first: u64, n: u64) -> Result<()> {
        let start = first / ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR;
        let end = (first + n)
            .next_multiple_of(ENTRIES_PER_SECTOR)
            .min(l1.len() as u64);
        let mut bytes = vec![0u8; ((end - start) * 8) as usize];
        encode_entries(&l1[start as usize..end as usize], &mut bytes);
        let off = self.header_read().l1_table_offset + start * 8;
        self.storage
            .write_at(&bytes, off)
            .context(|| format!("writing the L1 table of {}", self.name))
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}

/// Reads the header's sector, patches the 64 header bytes and writes the sector back.
fn write_header_to(storage: &dyn Storage, header: &Header) -> std::io::Result<()> {
    let mut sector = [0u8; SECTOR_SIZE as usize];
    storage.read_at(&mut sector, 0)?;
    sector[..HEADER_LEN].copy_from_slice(&header.encode());
    storage.write_at(&sector, 0)
}
