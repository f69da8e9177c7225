//! A new qcow2 image, written the way a copy writes: data clusters appended to the file
//! in the order they are first written (guest order, for a copy), the L2 tables of the
//! ranges written kept in memory, and the L2 tables, L1 table, refcounts and finally the
//! header laid out after the data at a flush. Nothing is allocated twice and no table is
//! read back, so a copy costs its data writes and little more. The price is crash
//! safety: the file is a consistent image only from a flush to the next write that
//! allocates (whose clusters may be those of the metadata the header still names), so a
//! crash in between means copying again, as after a crash of `qemu-img convert -t
//! unsafe`.

use super::qcow2_layout::{
    refcount_block, Geometry, Qcow2CreateOptions, COPIED, OFFSET_MASK, ZERO,
};
use crate::block::{check_range, BlockDevice, BlockStatus, Format};
use crate::error::{Error, IoContext, Result};
use crate::storage::Storage;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

/// A qcow2 image (version 3, 16-bit refcounts) being written from scratch. A
/// [`BlockDevice`]: reads, writes and zero writes (zero clusters where whole clusters
/// are zeroed over a backing file) at any offset; [`BlockDevice::flush`] writes the
/// metadata, after which the file is a complete image that `qemu-img check` finds clean.
/// Writes after a flush are fine too: the next flush lays the metadata out again and the
/// clusters of the old one are reused.
pub struct Qcow2Writer {
    storage: Box<dyn Storage>,
    name: String,
    options: Qcow2CreateOptions,
    geometry: Geometry,
    backing: Option<Box<dyn BlockDevice>>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Qcow2Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("name", &self.name)
            .field("geometry", &self.geometry)
            .finish_non_exhaustive()
    }
}

/// What changes as the image is written.
struct State {
    /// The L2 tables of the ranges written, by L1 index, as version 3 entries (host
    /// offset and flags). Only tables something was written to exist: memory grows as
    /// the image's own L2 metadata does.
    tables: BTreeMap<u64, Box<[u64]>>,
    space: Space,
    /// The clusters holding the metadata the last flush wrote: still the image's until
    /// the next change, then free.
    metadata: Vec<u64>,
    /// Whether the file's metadata is behind the writes.
    dirty: bool,
}

/// The file's clusters: every one below the frontier is in use, except the free ones.
struct Space {
    /// Where the next cluster appended goes; from here on the file reads as zeros.
    frontier: u64,
    /// Offsets of clusters below the frontier in no use: metadata an earlier flush wrote.
    free: BTreeSet<u64>,
    cluster_size: u64,
}

impl Space {
    /// A cluster, and whether it was used before (its bytes are not zeros).
    fn allocate(&mut self) -> (u64, bool) {
        match self.free.pop_first() {
            Some(c) => (c, true),
            None => {
                let c = self.frontier;
                self.frontier += self.cluster_size;
                (c, false)
            }
        }
    }

    /// `n` clusters in a row at the end of the file.
    fn append(&mut self, n: u64) -> u64 {
        let at = self.frontier;
        self.frontier += n * self.cluster_size;
        at
    }
}

/// How one guest cluster reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Place {
    /// From this host offset.
    Data(u64),
    /// As zeros (a zero cluster).
    Zero,
    /// From the backing file, or as zeros without one.
    Below,
}

fn place(entry: u64) -> Place {
    if entry & OFFSET_MASK != 0 && entry & ZERO == 0 {
        Place::Data(entry & OFFSET_MASK)
    } else if entry & ZERO != 0 {
        Place::Zero
    } else {
        Place::Below
    }
}

impl State {
    fn entry(&self, g: &Geometry, cluster: u64) -> u64 {
        let (i, j) = (cluster / g.l2_entries(), cluster % g.l2_entries());
        self.tables.get(&i).map_or(0, |t| t[j as usize])
    }

    fn set_entry(&mut self, g: &Geometry, cluster: u64, entry: u64) {
        let (i, j) = (cluster / g.l2_entries(), cluster % g.l2_entries());
        let n = g.l2_entries() as usize;
        self.tables
            .entry(i)
            .or_insert_with(|| vec![0; n].into_boxed_slice())[j as usize] = entry;
    }

    /// Before the metadata changes: the clusters the last flush wrote it to become free
    /// (the header still names them, but the image is not an image again until the next
    /// flush).
    fn change(&mut self) {
        self.space.free.extend(self.metadata.drain(..));
        self.dirty = true;
    }
}

impl Qcow2Writer {
    /// Makes a new image in `storage` (whatever it held is dropped), named `name` in
    /// messages, over `backing` (the device `options.backing_file` names; required with
    /// a name, refused without one). The file is an image once flushed.
    pub fn create(
        storage: Box<dyn Storage>,
        name: String,
        options: Qcow2CreateOptions,
        backing: Option<Box<dyn BlockDevice>>,
    ) -> Result<Self> {
        let geometry = options.validate()?;
        if options.backing_file.is_some() != backing.is_some() {
            return Err(Error::invalid_argument(
                "a qcow2 image's backing file name and its device go together".to_string(),
            ));
        }
        // Only when needed: emptying a file that holds data makes ext4 write back all
        // that is written after it when the file is closed.
        let len = storage
            .len()
            .context(|| format!("reading the length of {name}"))?;
        if len > 0 {
            storage.set_len(0).context(|| format!("emptying {name}"))?;
        }
        let cs = geometry.cluster_size();
        Ok(Self {
            storage,
            name,
            options,
            geometry,
            backing,
            state: Mutex::new(State {
                tables: BTreeMap::new(),
                // Cluster 0 is the header's.
                space: Space {
                    frontier: cs,
                    free: BTreeSet::new(),
                    cluster_size: cs,
                },
                metadata: Vec::new(),
                dirty: true,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn io_context(&self, what: &str, len: u64, at: u64) -> String {
        format!("{what} {len} bytes at {at} of {}", self.name)
    }

    /// Fills `buf` with what the backing file holds at `pos` (zeros past its end, or
    /// without one).
    fn read_below(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let avail = b.size().saturating_sub(pos).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut buf[..avail], pos)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// Calls `f` with each guest cluster `[offset, offset + len)` touches: its index,
    /// the offset in it and the bytes of it touched.
    fn for_each_cluster(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let bits = self.geometry.cluster_bits;
        let cs = self.geometry.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let c = pos >> bits;
            let within = pos - (c << bits);
            let n = (cs - within).min(end - pos);
            f(c, within, n)?;
            pos += n;
        }
        Ok(())
    }

    /// Lays out and writes the L2 tables, the L1 table, the refcounts and then the
    /// header, after the data: the file is then a complete image.
    fn write_metadata(&self, st: &mut State) -> Result<()> {
        let g = &self.geometry;
        let cs = g.cluster_size();
        let mut l1 = vec![0u64; g.l1_entries() as usize];
        let mut written = Vec::new();
        let mut buf = vec![0u8; cs as usize];
        for (&i, table) in &st.tables {
            if table.iter().all(|&e| e == 0) {
                continue;
            }
            let (at, _) = st.space.allocate();
            for (e, b) in table.iter().zip(buf.chunks_exact_mut(8)) {
                b.copy_from_slice(&e.to_be_bytes());
            }
            self.storage
                .write_at(&buf, at)
                .context(|| self.io_context("writing an L2 table of", cs, at))?;
            l1[i as usize] = at | COPIED;
            written.push(at);
        }
        let l1_at = match g.l1_clusters() {
            // An empty image's L1 table is empty, at offset 0, as QEMU writes it.
            0 => 0,
            n => st.space.append(n),
        };
        let l1_bytes = self.table_bytes(&l1, g.l1_clusters());
        if !l1_bytes.is_empty() {
            self.storage.write_at(&l1_bytes, l1_at).context(|| {
                self.io_context("writing the L1 table,", l1_bytes.len() as u64, l1_at)
            })?;
        }
        written.extend((0..g.l1_clusters()).map(|k| l1_at + k * cs));

        let (blocks, table_clusters) = g.refcount_clusters(st.space.frontier / cs);
        let blocks_at = st.space.append(blocks);
        let table_at = st.space.append(table_clusters);
        let end = st.space.frontier / cs;
        let per_block = g.refcounts_per_block();
        for k in 0..blocks {
            let at = blocks_at + k * cs;
            refcount_block(
                g,
                k * per_block,
                end,
                |c| !st.space.free.contains(&(c * cs)),
                &mut buf,
            );
            self.storage
                .write_at(&buf, at)
                .context(|| self.io_context("writing a refcount block of", cs, at))?;
        }
        let table: Vec<u64> = (0..blocks).map(|k| blocks_at + k * cs).collect();
        let table_bytes = self.table_bytes(&table, table_clusters);
        self.storage.write_at(&table_bytes, table_at).context(|| {
            self.io_context(
                "writing the refcount table,",
                table_bytes.len() as u64,
                table_at,
            )
        })?;
        written.extend((0..blocks + table_clusters).map(|k| blocks_at + k * cs));

        // The header last, once what it points to is durable: a crash leaves either the
        // old image or the new one.
        self.storage
            .flush()
            .context(|| format!("flushing {}", self.name))?;
        let header = self
            .options
            .header(g, l1_at, table_at, table_clusters)
            .map_err(|e| e.in_file(&self.name))?;
        self.storage
            .write_at(&header, 0)
            .context(|| self.io_context("writing the header,", cs, 0))?;
        self.storage
            .flush()
            .context(|| format!("flushing {}", self.name))?;
        st.metadata = written;
        st.dirty = false;
        Ok(())
    }

    /// A table of big-endian entries, padded with zeros to `clusters` clusters.
    fn table_bytes(&self, entries: &[u64], clusters: u64) -> Vec<u8> {
        let mut out = vec![0u8; (clusters * self.geometry.cluster_size()) as usize];
        for (e, b) in entries.iter().zip(out.chunks_exact_mut(8)) {
            b.copy_from_slice(&e.to_be_bytes());
        }
        out
    }
}

impl Drop for Qcow2Writer {
    /// An image dropped without a flush since its last write is still made complete:
    /// writes that returned must read back.
    fn drop(&mut self) {
        let mut st = self.lock();
        if st.dirty {
            if let Err(e) = self.write_metadata(&mut st) {
                crate::warnings::warn(&format!(
                    "could not complete the qcow2 image {}: {e}",
                    self.name
                ));
            }
        }
    }
}

impl BlockDevice for Qcow2Writer {
    fn size(&self) -> u64 {
        self.geometry.size
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn filename(&self) -> &str {
        &self.name
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        let mut places = Vec::new();
        {
            let st = self.lock();
            self.for_each_cluster(offset, buf.len() as u64, |c, within, n| {
                let p = match place(st.entry(&self.geometry, c)) {
                    Place::Data(h) => Place::Data(h + within),
                    p => p,
                };
                places.push((p, n));
                Ok(())
            })?;
        }
        let mut at = 0usize;
        for (p, n) in places {
            let part = &mut buf[at..at + n as usize];
            match p {
                Place::Data(h) => self
                    .storage
                    .read_at(part, h)
                    .context(|| self.io_context("reading", n, h))?,
                Place::Zero => part.fill(0),
                Place::Below => self.read_below(part, offset + at as u64)?,
            }
            at += n as usize;
        }
        Ok(())
    }

    /// Clusters not allocated yet are appended to the file. One written only in part
    /// keeps, in the rest, what it read before: the backing file's bytes are copied in,
    /// or zeros (which a cluster at the end of the file already reads as).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        let g = self.geometry;
        let cs = g.cluster_size();
        // Host ranges to write once the lock is let go, as (host, start, end in buf).
        let mut pieces: Vec<(u64, usize, usize)> = Vec::new();
        {
            let mut st = self.lock();
            let mut at = 0usize;
            self.for_each_cluster(offset, buf.len() as u64, |c, within, n| {
                let data = (at, at + n as usize);
                at += n as usize;
                let before = place(st.entry(&g, c));
                let host = match before {
                    Place::Data(h) => h,
                    _ => {
                        st.change();
                        let (h, used_before) = st.space.allocate();
                        let below = before == Place::Below && self.backing.is_some();
                        let filled = n < cs && (used_before || below);
                        if filled {
                            // Written whole now, under the lock, so that no write to
                            // the rest of the cluster can run before it and be undone.
                            let mut cluster = vec![0u8; cs as usize];
                            let result = match before {
                                Place::Below => self.read_below(&mut cluster, c * cs),
                                _ => Ok(()),
                            }
                            .and_then(|()| {
                                let w = within as usize;
                                cluster[w..w + n as usize].copy_from_slice(&buf[data.0..data.1]);
                                self.storage
                                    .write_at(&cluster, h)
                                    .context(|| self.io_context("writing", cs, h))
                            });
                            if let Err(e) = result {
                                st.space.free.insert(h);
                                return Err(e);
                            }
                        }
                        st.set_entry(&g, c, h | COPIED);
                        if filled {
                            return Ok(());
                        }
                        h
                    }
                };
                let h = host + within;
                match pieces.last_mut() {
                    Some(last) if last.0 + (last.2 - last.1) as u64 == h && last.2 == data.0 => {
                        last.2 = data.1
                    }
                    _ => pieces.push((h, data.0, data.1)),
                }
                Ok(())
            })?;
        }
        for (h, a, b) in pieces {
            self.storage
                .write_at(&buf[a..b], h)
                .context(|| self.io_context("writing", (b - a) as u64, h))?;
        }
        Ok(())
    }

    /// Whole clusters over a backing file become zero clusters; without one, clusters
    /// never written already read as zeros and are left alone. Data clusters are zeroed
    /// in place.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size())?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut in_place = Vec::new();
        let mut partial = Vec::new();
        {
            let mut st = self.lock();
            self.for_each_cluster(offset, len, |c, within, n| {
                match place(st.entry(&g, c)) {
                    Place::Data(h) => in_place.push((h + within, n)),
                    Place::Zero => {}
                    Place::Below if self.backing.is_none() => {}
                    Place::Below if n == cs => {
                        st.change();
                        st.set_entry(&g, c, ZERO);
                    }
                    Place::Below => partial.push(((c * cs) + within, n)),
                }
                Ok(())
            })?;
        }
        for (h, n) in in_place {
            self.storage
                .zero_range(h, n)
                .context(|| self.io_context("zeroing", n, h))?;
        }
        for (pos, n) in partial {
            self.write_at(&vec![0u8; n as usize], pos)?;
        }
        Ok(())
    }

    /// Nothing is given back: the clusters keep what they hold.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size())
    }

    /// Writes the metadata (when anything changed since the last flush) and makes the
    /// file durable.
    fn flush(&self) -> Result<()> {
        let mut st = self.lock();
        if st.dirty {
            self.write_metadata(&mut st)
        } else {
            self.storage
                .flush()
                .context(|| format!("flushing {}", self.name))
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(offset, len, self.size())?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let st = self.lock();
        let first = offset >> g.cluster_bits;
        let start = place(st.entry(&g, first));
        let end = offset + len;
        let mut c = first + 1;
        while c * cs < end {
            let next = place(st.entry(&g, c));
            let same = match (start, next) {
                (Place::Data(a), Place::Data(b)) => b == a + (c - first) * cs,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            c += 1;
        }
        let run = (c * cs).min(end) - offset;
        let within = offset - first * cs;
        Ok(match start {
            Place::Data(h) => BlockStatus {
                len: run.max(1),
                allocated: true,
                data: true,
                zero: false,
                offset: Some(h + within),
            },
            Place::Zero => BlockStatus {
                len: run.max(1),
                allocated: true,
                data: false,
                zero: true,
                offset: None,
            },
            Place::Below => BlockStatus {
                len: run.max(1),
                allocated: false,
                data: false,
                zero: false,
                offset: None,
            },
        })
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref()
    }

    fn release_file_locks(&self) {
        self.storage.release_locks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn writer(cs: u64, size: u64) -> Qcow2Writer {
        let opts = Qcow2CreateOptions {
            cluster_size: cs,
            ..Qcow2CreateOptions::new(size)
        };
        Qcow2Writer::create(Box::new(MemoryStorage::new()), "t".into(), opts, None).unwrap()
    }

    #[test]
    fn writes_read_back_before_and_after_a_flush() {
        let w = writer(4096, 1 << 20);
        w.write_at(&[7; 100], 5000).unwrap();
        w.write_at(&[9; 8192], 65536).unwrap();
        let mut b = vec![1u8; 200];
        w.read_at(&mut b, 4950).unwrap();
        assert!(b[..50].iter().all(|&x| x == 0));
        assert!(b[50..150].iter().all(|&x| x == 7));
        assert!(b[150..].iter().all(|&x| x == 0));
        w.flush().unwrap();
        w.write_at(&[3; 10], 5010).unwrap();
        w.write_at(&[4; 4096], 200 << 10).unwrap();
        w.flush().unwrap();
        let mut b = vec![0u8; 120];
        w.read_at(&mut b, 5000).unwrap();
        assert_eq!(&b[..10], &[7; 10]);
        assert_eq!(&b[10..20], &[3; 10]);
        assert!(b[100..].iter().all(|&x| x == 0));
        let mut b = vec![0u8; 4096];
        w.read_at(&mut b, 200 << 10).unwrap();
        assert!(b.iter().all(|&x| x == 4));
    }

    #[test]
    fn clusters_written_in_order_lie_in_order() {
        let w = writer(65536, 16 << 20);
        w.write_at(&vec![1; 3 << 16], 1 << 20).unwrap();
        let s = w.block_status(1 << 20, 3 << 16).unwrap();
        assert_eq!(s.len, 3 << 16);
        assert_eq!(s.offset, Some(65536));
        let s = w.block_status(0, 1 << 20).unwrap();
        assert!(!s.allocated);
        assert_eq!(s.len, 1 << 20);
    }

    #[test]
    fn a_partial_write_over_a_backing_file_copies_the_rest_of_the_cluster() {
        let base = writer(4096, 1 << 20);
        base.write_at(&vec![5; 1 << 20], 0).unwrap();
        let opts = Qcow2CreateOptions {
            cluster_size: 4096,
            backing_file: Some("base".into()),
            backing_format: Some(Format::Qcow2),
            ..Qcow2CreateOptions::new(1 << 20)
        };
        let w = Qcow2Writer::create(
            Box::new(MemoryStorage::new()),
            "top".into(),
            opts,
            Some(Box::new(base)),
        )
        .unwrap();
        w.write_at(&[1; 10], 4100).unwrap();
        w.write_zeroes(8192, 4096).unwrap();
        w.write_zeroes(12288, 100).unwrap();
        let mut b = vec![0u8; 16384];
        w.read_at(&mut b, 0).unwrap();
        assert!(b[..4100].iter().all(|&x| x == 5));
        assert!(b[4100..4110].iter().all(|&x| x == 1));
        assert!(b[4110..8192].iter().all(|&x| x == 5));
        assert!(b[8192..12388].iter().all(|&x| x == 0));
        assert!(b[12388..].iter().all(|&x| x == 5));
        assert!(w.block_status(8192, 4096).unwrap().zero);
    }
}
