//! The [`Image`] type: what one open QED image holds, how it is opened (handed its
//! backing file, never opening one), and how it is closed.

use super::allocator::Allocator;
use super::create::{self, CreateOptions};
use super::flush_group::FlushGroup;
use super::header::{write_header, write_header_to, HeaderCell};
use super::l1::L1Table;
use super::l2cache::PAGE_ENTRIES;
use super::layers::{Backing, BackingChain};
use super::report::{CheckReport, RepairMode};
use super::tables::{self, TableFile, Tables};
use crate::block::{BlockDevice, Format};
use crate::error::{Error, IoContext, Result};
use crate::format::header::{features, table_offset_is_valid, HEADER_LEN};
use crate::format::{Geometry, Header, MAGIC};
use crate::storage::{FileStorage, RemoteIdentity, Storage};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Default bound on cached L2 entries: 16 MiB, which maps 256 GiB of guest space with
/// 64 KiB clusters.
pub const DEFAULT_L2_CACHE_BYTES: usize = 16 << 20;

/// What the engine needs to know to open an image (the chain's `OpenOptions` carry
/// these, and more).
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// Refuse writes; do not touch the file.
    pub read_only: bool,
    /// Upper bound on memory used for cached L2 table entries, in bytes.
    pub l2_cache_bytes: usize,
    /// On a read-write open of an image with NEED_CHECK set, check and repair it first
    /// (turn this off only to run a repair of your own right after opening).
    pub repair_on_open: bool,
    /// Reads of clusters the image does not hold write what they read into it (see
    /// `populate.rs`); the image itself only, its backing files staying read-only.
    /// Ignored when read-only or without a backing file.
    pub copy_on_read: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            l2_cache_bytes: DEFAULT_L2_CACHE_BYTES,
            repair_on_open: true,
            copy_on_read: false,
        }
    }
}

/// An open QED image. `Send + Sync`; every I/O method takes `&self`.
#[derive(Debug)]
pub struct Image {
    pub(super) storage: Box<dyn Storage>,
    pub(super) geometry: Geometry,
    pub(super) header: HeaderCell,
    /// The backing file, the layer of its chain reads go through to, and the name the
    /// header stores.
    pub(super) backing: BackingChain,
    /// Reads of unallocated clusters copy what they read into the image.
    pub(super) copy_on_read: bool,
    pub(super) read_only: bool,
    pub(super) name: String,
    /// First byte past the header area: data and tables live at or after it.
    pub(super) data_start: u64,
    /// L1, the L2 cache and their write-back.
    pub(super) tables: Tables,
    /// Which file clusters are whose: the frontier, claims, the gate, epochs, the free
    /// set and the freeze of moved clusters.
    pub(super) alloc: Allocator,
    /// Coalesces concurrent flushes.
    pub(super) flushes: FlushGroup,
    /// What the check run at open (NEED_CHECK set, read-write) found and fixed.
    open_repair: Option<CheckReport>,
    closed: AtomicBool,
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
    backing_pin: Option<RemoteIdentity>,
}

impl OpeningImage {
    /// The backing file name the header stores, if any.
    pub fn backing_name(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }

    /// The identity of the remote base the image is pinned to, if its header area holds
    /// a record for the backing file it names (see [`Image::base_pin`]).
    pub fn backing_pin(&self) -> Option<&RemoteIdentity> {
        self.backing_pin.as_ref()
    }

    /// The backing file's format as the header declares it: `Some(Raw)` when NO_PROBE
    /// is set, else `None` (to be probed).
    pub fn declared_backing_format(&self) -> Option<Format> {
        self.header.backing_is_raw().then_some(Format::Raw)
    }

    /// Finishes opening with the backing file the header names (`None` without one):
    /// reads L1, drops autoclear bits it does not know, and repairs an image left with
    /// NEED_CHECK set when the options ask for it.
    pub fn finish(self, backing: Option<Backing>, opts: &ImageOptions) -> Result<Image> {
        if self.backing_name.is_some() != backing.is_some() {
            return Err(Error::invalid_argument(format!(
                "{}: a backing file must be given exactly when the header names one",
                self.name
            )));
        }
        let mut image = self.into_image(backing, opts)?;
        if image.header.get().needs_check() && !opts.read_only && opts.repair_on_open {
            image.repair_at_open()?;
        }
        Ok(image)
    }

    fn into_image(mut self, backing: Option<Backing>, opts: &ImageOptions) -> Result<Image> {
        let name = self.name;
        let l1 = L1Table::load(
            &*self.storage,
            self.header.l1_table_offset,
            &self.geometry,
            self.header.image_size,
        )
        .context(|| format!("reading the L1 table of {name}"))?;
        let unknown_autoclear = self.header.autoclear_features & !features::KNOWN_AUTOCLEAR;
        if unknown_autoclear != 0 && !opts.read_only {
            // Bits an older writer set that this one cannot keep true: drop them, as
            // the format asks.
            self.header.autoclear_features &= features::KNOWN_AUTOCLEAR;
            write_header_to(&*self.storage, &self.header).context(|| {
                format!("clearing unknown autoclear bits {unknown_autoclear:#x} in {name}")
            })?;
        }
        Ok(Image {
            alloc: Allocator::at_open(&self.geometry, self.file_len),
            data_start: self.header.header_bytes(),
            storage: self.storage,
            geometry: self.geometry,
            header: HeaderCell::at_open(self.header),
            copy_on_read: opts.copy_on_read && !opts.read_only && backing.is_some(),
            backing: BackingChain::at_open(backing),
            read_only: opts.read_only,
            name,
            tables: Tables::at_open(l1, opts.l2_cache_bytes),
            flushes: FlushGroup::default(),
            open_repair: None,
            closed: false.into(),
        })
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
            return Err(too_short(&*storage, file_len, &name));
        }
        let mut hb = [0u8; HEADER_LEN];
        storage
            .read_at(&mut hb, 0)
            .context(|| format!("reading the header of {name}"))?;
        let in_file = |e: Error| e.in_file(&name);
        let header = Header::decode(&hb).map_err(in_file)?;
        let geometry = header.validate(file_len).map_err(in_file)?;
        let backing_name = read_backing_name(&*storage, &header, &name)?;
        let backing_pin = match &backing_name {
            Some(backing) => super::header_area::read_pin(&*storage, &header, backing)
                .context(|| format!("reading the header area of {name}"))?,
            None => None,
        };
        Ok(OpeningImage {
            storage,
            name,
            header,
            geometry,
            file_len,
            backing_name,
            backing_pin,
        })
    }

    /// The repair at open of an image left with NEED_CHECK set.
    fn repair_at_open(&mut self) -> Result<()> {
        // Until the check succeeds, dropping the image must not close it cleanly: that
        // would clear NEED_CHECK and let the next open skip the check.
        self.closed.store(true, Ordering::Release);
        let report = self.repair(RepairMode::All)?;
        let left = |what: String| {
            Error::Unsupported(format!(
                "{}: NEED_CHECK is set and the check {what}; run 'qed check -r all' and \
                 inspect the image",
                self.name
            ))
        };
        if report.corruptions_remaining() > 0 {
            return Err(left(format!(
                "left {} corruptions",
                report.corruptions_remaining()
            )));
        }
        if report.check_errors > 0 {
            return Err(left(format!(
                "could not finish ({} errors)",
                report.check_errors
            )));
        }
        self.closed.store(false, Ordering::Release);
        self.open_repair = Some(report);
        Ok(())
    }

    /// Creates an image file from `opts`, truncating any file at `path`.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
        Self::create_pinned(path, opts, None)
    }

    /// Creates an image file as [`Image::create`] does, pinned to `pin`, the remote
    /// object its backing file names (see [`Image::base_pin`]).
    pub fn create_pinned(
        path: impl AsRef<Path>,
        opts: &CreateOptions,
        pin: Option<&RemoteIdentity>,
    ) -> Result<()> {
        let path = path.as_ref();
        // Refused before the file is touched.
        let header = opts.header()?;
        super::header_area::new_header_tail(
            header.header_bytes(),
            opts.backing_file.as_deref(),
            pin,
        )?;
        let storage = FileStorage::create(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::ResourceBusy => Error::from_lock(path, e, false),
            _ => Error::Io {
                context: format!("creating {}", path.display()),
                cause: e,
            },
        })?;
        create::create_on(&storage, opts, pin)?;
        storage
            .flush()
            .context(|| format!("flushing {}", path.display()))
    }

    /// Writes a new image into empty `storage`.
    pub fn create_on(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
        create::create_on(storage, opts, None)
    }

    /// The image's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.header.get().clone()
    }

    /// The backing file, if the header names one. After a stream made a deeper layer the
    /// backing file while the image was open, this is still the file it was opened with
    /// (which reads the same); the header names the new one.
    pub fn backing_file(&self) -> Option<&Backing> {
        self.backing.file()
    }

    /// The backing file name the header stores now, if any: after a stream kept a deeper
    /// layer while the image was open, that layer's name rather than
    /// [`Image::backing_file`]'s.
    pub fn header_backing_name(&self) -> Option<String> {
        self.backing.header_name()
    }

    /// What the consistency check run at open found and repaired, when NEED_CHECK was set.
    pub fn open_repair(&self) -> Option<&CheckReport> {
        self.open_repair.as_ref()
    }

    /// The length of the image's file in bytes (the file may have grown ahead of the
    /// clusters in use while the image is open; close gives that back).
    pub fn file_len(&self) -> Result<u64> {
        self.storage
            .len()
            .context(|| format!("reading the size of {}", self.name))
    }

    /// Flushes and clears NEED_CHECK. Dropping the image does the same, ignoring errors.
    pub fn close(self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) || self.read_only {
            return Ok(());
        }
        let trimmed = self.alloc.trim(&*self.storage, &self.name);
        self.flush_image().and(trimmed)?;
        self.give_back_free_tail()
    }

    /// Rewrites the header in the file, keeping the rest of its sector as QEMU does.
    pub(super) fn write_header(&self, header: &Header) -> Result<()> {
        write_header(&*self.storage, header, &self.name)
    }

    /// Whether a write in place to the `len` bytes at `pos` must wait: a move holds one
    /// of their clusters.
    #[inline]
    pub(super) fn is_frozen(&self, pos: u64, len: u64) -> bool {
        let cs = self.geometry.cluster_size();
        let first = pos / cs;
        self.alloc
            .is_frozen(first, (pos + len).div_ceil(cs) - first)
    }

    /// Waits until no claim holds the clusters of the `len` bytes at `pos`.
    pub(super) fn wait_thawed(&self, pos: u64, len: u64) {
        let cs = self.geometry.cluster_size();
        let first = pos / cs;
        self.alloc
            .wait_released(first, (pos + len).div_ceil(cs) - first);
    }

    /// The file as the tables see it.
    #[inline]
    pub(super) fn table_file(&self) -> TableFile<'_> {
        TableFile {
            storage: &*self.storage,
            geometry: self.geometry,
            name: &self.name,
        }
    }

    /// The L1 entry at `index` (0 past the entries covering the image size).
    #[inline]
    pub(super) fn l1_entry(&self, index: u64) -> Result<u64> {
        let size = self.header.get().image_size;
        self.tables.l1_entry(self.table_file(), size, index)
    }

    /// Re-reads the L1 entries covering the current size from the file.
    pub(super) fn load_l1(&self) -> Result<()> {
        let size = self.header.get().image_size;
        self.tables.reload_l1(self.table_file(), size)
    }

    /// Writes L1 entries `entries`, the first of them at index `first` (a multiple of a
    /// sector's entries).
    pub(super) fn write_l1_sectors(&self, entries: &[u64], first: u64) -> Result<()> {
        self.tables
            .write_l1_sectors(self.table_file(), entries, first)
    }

    /// Checks that an L2 table offset read from the L1 table is usable.
    pub(super) fn check_l2_offset(&self, l1_index: u64, offset: u64) -> Result<()> {
        let header = self.header.get();
        if table_offset_is_valid(&header, &self.geometry, self.alloc.frontier(), offset) {
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

    /// Sets the L2 entries of `n` clusters from guest offset `first` (all inside one page
    /// of entries) to `value(i)`, creating the L2 table if there is none. The caller holds
    /// the claim on those clusters and the allocation gate. With `write_back`, dirty
    /// entries past the cache's limit are written back now; without, the next flush or
    /// blocking allocation does it.
    pub(super) fn set_l2_entries(
        &self,
        first: u64,
        n: u64,
        write_back: bool,
        value: impl Fn(u64) -> u64,
    ) -> Result<()> {
        let g = self.geometry;
        let l1_index = g.l1_index(first);
        let l2_index = g.l2_index(first);
        let page_first = l2_index % PAGE_ENTRIES;
        let updates: Vec<(usize, u64)> = (0..n)
            .map(|i| ((page_first + i) as usize, value(i)))
            .collect();
        loop {
            let l2_offset = self.l1_entry(l1_index)?;
            if l2_offset != 0 {
                self.check_l2_offset(l1_index, l2_offset)?;
                return self.tables.set_entries(
                    &*self.storage,
                    l2_offset,
                    l2_index,
                    &updates,
                    write_back.then_some(self.backing.opened_with_one()),
                    || self.flush_storage(),
                );
            }
            let Some(_table_claim) = self.alloc.claim_table(l1_index) else {
                continue; // someone else was creating the table: look again
            };
            if self.l1_entry(l1_index)? != 0 {
                continue;
            }
            let table = self.reserve(g.table_bytes())?;
            return self.tables.create_table(
                self.table_file(),
                table,
                l1_index,
                l2_index,
                &updates,
                || self.flush_storage(),
            );
        }
    }

    /// Writes the L2 entries changed in memory since the last write-back (see
    /// [`Tables::write_back`]).
    pub(super) fn write_back_tables(&self) -> Result<()> {
        // Opened with a backing file, entries follow their data to disk even after a
        // stream cut the backing file off: an allocation made before the cut took no
        // NEED_CHECK, so only this order keeps its entries from exposing unwritten data.
        let follow = self.backing.opened_with_one();
        self.tables
            .write_back(&*self.storage, follow, || self.flush_storage())
    }

    /// Reads table entries `first..first + out.len()` of the table at `table`.
    pub(super) fn read_entries(
        &self,
        table: u64,
        first: u64,
        out: &mut [u64],
    ) -> std::io::Result<()> {
        tables::read_entries(&*self.storage, table, first, out)
    }

    /// Writes `entries` as entries `first..` of the table at `table` (whole sectors).
    pub(super) fn write_entries(
        &self,
        table: u64,
        first: u64,
        entries: &[u64],
    ) -> std::io::Result<()> {
        tables::write_entries(&*self.storage, table, first, entries)
    }

    /// Whether the header names a backing file (opened or not).
    pub(super) fn backing_present(&self) -> bool {
        self.backing.present()
    }

    /// The device unallocated clusters read through to: the backing file, or the layer
    /// of its chain a stream made the new backing file. `None` without one, or when the
    /// image was opened without its backing chain.
    pub(super) fn backing_device(&self) -> Option<&dyn BlockDevice> {
        self.backing.device()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}

/// The error for a file too short to hold a header: not QED at all, unless what it has
/// is the start of the magic.
fn too_short(storage: &dyn Storage, file_len: u64, name: &str) -> Error {
    let mut start = vec![0u8; file_len as usize];
    if let Err(cause) = storage.read_at(&mut start, 0) {
        return Error::Io {
            context: format!("reading the header of {name}"),
            cause,
        };
    }
    let n = start.len().min(MAGIC.len());
    let error = if start[..n] == MAGIC[..n] {
        Error::invalid_header(
            "file size",
            file_len,
            "too small to hold a QED header (64 bytes)",
        )
    } else {
        let mut found = [0u8; 4];
        found[..n].copy_from_slice(&start[..n]);
        Error::BadMagic {
            file: String::new(),
            found,
        }
    };
    error.in_file(name)
}

/// The backing file name the header stores, if it names one.
fn read_backing_name(storage: &dyn Storage, header: &Header, name: &str) -> Result<Option<String>> {
    if !header.has_backing_file() {
        return Ok(None);
    }
    let mut raw = vec![0u8; header.backing_filename_size as usize];
    storage
        .read_at(&mut raw, header.backing_filename_offset.into())
        .context(|| format!("reading the backing file name of {name}"))?;
    String::from_utf8(raw).map(Some).map_err(|_| {
        Error::invalid_header(
            "backing_filename_offset",
            header.backing_filename_offset.into(),
            "the backing file name is not valid UTF-8",
        )
        .in_file(name)
    })
}
