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

use crate::block::{BlockDevice, Format};
use crate::error::{Error, IoContext, Result};
use crate::format::geometry::SECTOR_SIZE;
use crate::format::header::{features, table_offset_is_valid, HEADER_LEN};
use crate::format::table::{decode_entries, encode_entries};
use crate::format::{Geometry, Header, MAGIC};
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
    /// The length of the file: the frontier, or past it where the storage grew ahead
    /// (`Storage::extend`). Clusters between the frontier and here are unused and read
    /// as zeros; a crash leaves them as leaks, and close gives them back.
    file_len: u64,
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
    /// Serializes write-backs of L2 entries (see `write_back_tables`).
    write_back_lock: Mutex<()>,
    /// A write of L1 sectors failed, so the file may hold them or not: the copy in
    /// memory is re-read before its next use, or a later request could act on an entry
    /// the file no longer has (or miss one it has).
    l1_stale: std::sync::atomic::AtomicBool,
    /// Opened with NEED_CHECK set and not successfully checked since: the metadata may
    /// be inconsistent, so only a repair may clear the bit, never a flush or close.
    unchecked: std::sync::atomic::AtomicBool,
    /// Coalesces concurrent flushes.
    flushes: alloc::FlushGroup,
    /// What the check run at open (NEED_CHECK set, read-write) found and fixed.
    open_repair: Option<CheckReport>,
    closed: std::sync::atomic::AtomicBool,
}

/// What the engine needs to know to open an image (the chain's `OpenOptions` carry
/// these, and more).
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// Refuse writes; do not touch the file.
    pub read_only: bool,
    /// Upper bound on memory used for cached L2 table entries, in bytes.
    pub l2_cache_bytes: usize,
    /// On a read-write open of an image with NEED_CHECK set, check and repair it first.
    pub repair_on_open: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            l2_cache_bytes: DEFAULT_L2_CACHE_BYTES,
            repair_on_open: true,
        }
    }
}

/// An image whose header has been read and validated, waiting for its backing file:
/// the engine never opens one itself. [`OpeningImage::backing_name`] says what the
/// header names; [`OpeningImage::finish`] takes the opened backing device.
#[derive(Debug)]
pub struct OpeningImage {
    storage: Box<dyn Storage>,
    name: String,
    header: Header,
    geometry: Geometry,
    file_len: u64,
    backing_name: Option<String>,
}

impl OpeningImage {
    /// The backing file name the header stores, if any.
    pub fn backing_name(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }

    /// The backing file's format as the header declares it: `Some(Raw)` when NO_PROBE
    /// is set, else `None` (to be probed).
    pub fn declared_backing_format(&self) -> Option<Format> {
        self.header.backing_is_raw().then_some(Format::Raw)
    }

    /// Finishes opening with the backing file the header names (`None` without one).
    pub fn finish(self, backing: Option<Backing>, opts: &ImageOptions) -> Result<Image> {
        Image::finish_open(self, backing, opts)
    }
}

impl Image {
    /// Reads and validates the header of the image in `storage` (the first step of
    /// opening it). `name` names the image in messages.
    pub fn begin_open(storage: Box<dyn Storage>, name: String) -> Result<OpeningImage> {
        let file_len = storage
            .len()
            .context(|| format!("reading the size of {name}"))?;
        if file_len < HEADER_LEN as u64 {
            let mut start = vec![0u8; file_len as usize];
            storage
                .read_at(&mut start, 0)
                .context(|| format!("reading the header of {name}"))?;
            let error = if MAGIC.starts_with(&start) {
                Error::invalid_header(
                    "file size",
                    file_len,
                    "too small to hold a QED header (64 bytes)",
                )
            } else {
                let mut found = [0u8; 4];
                found[..start.len().min(4)].copy_from_slice(&start[..start.len().min(4)]);
                Error::BadMagic {
                    file: String::new(),
                    found,
                }
            };
            return Err(error.in_file(&name));
        }
        let mut hb = [0u8; HEADER_LEN];
        storage
            .read_at(&mut hb, 0)
            .context(|| format!("reading the header of {name}"))?;
        let in_file = |e: Error| e.in_file(&name);
        let header = Header::decode(&hb).map_err(in_file)?;
        let geometry = header.validate(file_len).map_err(in_file)?;
        let backing_name = if header.has_backing_file() {
            let mut raw = vec![0u8; header.backing_filename_size as usize];
            storage
                .read_at(&mut raw, header.backing_filename_offset.into())
                .context(|| format!("reading the backing file name of {name}"))?;
            Some(String::from_utf8(raw).map_err(|_| {
                Error::invalid_header(
                    "backing_filename_offset",
                    header.backing_filename_offset.into(),
                    "the backing file name is not valid UTF-8",
                )
                .in_file(&name)
            })?)
        } else {
            None
        };
        Ok(OpeningImage {
            storage,
            name,
            header,
            geometry,
            file_len,
            backing_name,
        })
    }

    fn finish_open(
        opening: OpeningImage,
        backing: Option<Backing>,
        opts: &ImageOptions,
    ) -> Result<Self> {
        let OpeningImage {
            storage,
            name,
            mut header,
            geometry,
            file_len,
            backing_name,
        } = opening;
        if backing_name.is_some() != backing.is_some() {
            return Err(Error::invalid_argument(format!(
                "{name}: a backing file must be given exactly when the header names one"
            )));
        }
        let frontier = geometry.cluster_start(file_len);
        let l1_len = geometry
            .l1_entries_for(header.image_size)
            .next_multiple_of(ENTRIES_PER_SECTOR)
            .min(geometry.entries_per_table());
        let mut l1 = vec![0u64; l1_len as usize];
        read_l1_into(&*storage, header.l1_table_offset, &mut l1)
            .context(|| format!("reading the L1 table of {name}"))?;
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
                file_len,
            }),
            claims: alloc::Claims::default(),
            gate: alloc::Gate::default(),
            need_check_lock: Mutex::new(()),
            l1_lock: Mutex::new(()),
            write_back_lock: Mutex::new(()),
            l1_stale: false.into(),
            unchecked: needs_check.into(),
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
}

impl Image {
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
        let trimmed = self.trim_growth();
        self.flush_image().and(trimmed)
    }

    /// Gives back the space the file grew ahead of the frontier, so that the file ends
    /// where its last cluster does (as QEMU, and a check, expect of a closed image).
    fn trim_growth(&self) -> Result<()> {
        let mut grow = self.lock_grow();
        let frontier = self.file_clusters_end();
        if grow.file_len > frontier {
            self.storage
                .set_len(frontier)
                .context(|| format!("trimming {} to {frontier} bytes", self.name))?;
            grow.file_len = frontier;
        }
        Ok(())
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

    /// The L1 entry at `index` (0 past the entries covering the image size).
    fn l1_entry(&self, index: u64) -> Result<u64> {
        if self.l1_stale.load(Ordering::Acquire) {
            let _l1 = self.l1_lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.l1_stale.load(Ordering::Acquire) {
                self.load_l1()?;
                self.l1_stale.store(false, Ordering::Release);
            }
        }
        Ok(self
            .l1
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(index as usize)
            .copied()
            .unwrap_or(0))
    }

    /// Writes L1 entries `entries`, the first of them at index `first` (a multiple of
    /// 64, so that only whole sectors are written), a chunk at a time.
    fn write_l1_sectors(&self, entries: &[u64], first: u64) -> Result<()> {
        debug_assert_eq!(first % ENTRIES_PER_SECTOR, 0);
        let base = self.header_read().l1_table_offset + first * 8;
        let mut bytes = vec![0u8; entries.len().min(L1_CHUNK_ENTRIES) * 8];
        for (i, chunk) in entries.chunks(L1_CHUNK_ENTRIES).enumerate() {
            let b = &mut bytes[..chunk.len() * 8];
            encode_entries(chunk, b);
            self.storage
                .write_at(b, base + (i * L1_CHUNK_ENTRIES * 8) as u64)
                .inspect_err(|_| self.l1_stale.store(true, Ordering::Release))
                .context(|| format!("writing the L1 table of {}", self.name))?;
        }
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}

/// L1 entries encoded or decoded at a time: the L1 in memory can reach 16 MiB, and its
/// bytes are never held whole besides it.
const L1_CHUNK_ENTRIES: usize = 8192;

/// Fills `l1` with the L1 entries at `offset`.
fn read_l1_into(storage: &dyn Storage, offset: u64, l1: &mut [u64]) -> std::io::Result<()> {
    let mut bytes = vec![0u8; L1_CHUNK_ENTRIES.min(l1.len()) * 8];
    for (i, chunk) in l1.chunks_mut(L1_CHUNK_ENTRIES).enumerate() {
        let b = &mut bytes[..chunk.len() * 8];
        storage.read_at(b, offset + (i * L1_CHUNK_ENTRIES * 8) as u64)?;
        decode_entries(b, chunk);
    }
    Ok(())
}

/// Reads the header's sector, patches the 64 header bytes and writes the sector back.
fn write_header_to(storage: &dyn Storage, header: &Header) -> std::io::Result<()> {
    let mut sector = [0u8; SECTOR_SIZE as usize];
    storage.read_at(&mut sector, 0)?;
    sector[..HEADER_LEN].copy_from_slice(&header.encode());
    storage.write_at(&sector, 0)
}
