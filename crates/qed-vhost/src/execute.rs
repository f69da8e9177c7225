//! Carrying out a parsed request on the device, with the guest's memory as its source
//! or destination.

use crate::config::{DeviceConfig, MAX_REQUEST, MAX_ZERO_SECTORS, MAX_ZERO_SEGMENTS, SECTOR};
use crate::request::{Kind, Request};
use qed::{BlockDevice, DiscardMode};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

/// How a request ended: its status, and the bytes of data it wrote into guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) status: u8,
    pub(crate) written: u32,
}

impl Outcome {
    fn ok(written: u32) -> Self {
        Self {
            status: VIRTIO_BLK_S_OK as u8,
            written,
        }
    }

    fn status(status: u32) -> Self {
        Self {
            status: status as u8,
            written: 0,
        }
    }
}

/// What a request runs against.
pub(crate) struct Target<'a> {
    pub(crate) device: &'a dyn BlockDevice,
    pub(crate) config: &'a DeviceConfig,
    /// Whether the guest runs with a write cache (flushing itself); without, every
    /// write is made durable before it completes.
    pub(crate) writeback: bool,
    pub(crate) log: fn(&str),
}

/// Carries out `req`; a failure of the device is an I/O error status, logged once per
/// request, never a failure of the backend.
pub(crate) fn execute(t: &Target<'_>, mem: &GuestMemoryMmap, req: &Request) -> Outcome {
    let ioerr = |what: &str, e: &dyn std::fmt::Display| {
        (t.log)(&format!("{} at sector {} failed: {e}", what, req.sector));
        Outcome::status(VIRTIO_BLK_S_IOERR)
    };
    match req.kind {
        Kind::Read => {
            let Some((offset, len)) = transfer(t.config, mem, req, true) else {
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            };
            let mut buf = vec![0u8; len];
            if let Err(e) = t.device.read_at(&mut buf, offset) {
                return ioerr("a read", &e);
            }
            if !scatter(mem, req, &buf) {
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            }
            Outcome::ok(len as u32)
        }
        Kind::Write => {
            if t.config.options.read_only {
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            }
            let Some((offset, len)) = transfer(t.config, mem, req, false) else {
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            };
            let mut buf = vec![0u8; len];
            if !gather(mem, req, &mut buf) {
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            }
            if let Err(e) = t.device.write_at(&buf, offset) {
                return ioerr("a write", &e);
            }
            durable(t, req)
        }
        Kind::Flush => match t.device.flush() {
            Ok(()) => Outcome::ok(0),
            Err(e) => ioerr("a flush", &e),
        },
        Kind::GetId => {
            let Some(s) = req
                .data
                .first()
                .filter(|s| s.writable && req.data.len() == 1)
            else {
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            };
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let serial = t.config.options.serial.as_bytes();
            let n = serial.len().min(id.len());
            id[..n].copy_from_slice(&serial[..n]);
            let n = (s.len as usize).min(id.len());
            match mem.write_slice(&id[..n], s.addr) {
                Ok(()) => Outcome::ok(n as u32),
                Err(_) => Outcome::status(VIRTIO_BLK_S_IOERR),
            }
        }
        Kind::Discard | Kind::WriteZeroes => zero(t, mem, req),
        Kind::Other(_) => Outcome::status(VIRTIO_BLK_S_UNSUPP),
    }
}

/// The byte range of a read (`into_guest`) or write: `None` when the data runs the
/// wrong way, is not whole sectors, is too large, lies outside guest memory, or reaches
/// past the end of the disk.
pub(crate) fn transfer(
    config: &DeviceConfig,
    mem: &GuestMemoryMmap,
    req: &Request,
    into_guest: bool,
) -> Option<(u64, usize)> {
    let mut len = 0u64;
    for s in &req.data {
        if s.writable != into_guest || !GuestMemoryBackend::check_range(mem, s.addr, s.len as usize)
        {
            return None;
        }
        len += u64::from(s.len);
    }
    if len == 0 || len % SECTOR != 0 || len > MAX_REQUEST {
        return None;
    }
    let end = req.sector.checked_add(len / SECTOR)?;
    if end > config.capacity_sectors {
        return None;
    }
    Some((req.sector * SECTOR, len as usize))
}

/// Copies a read's data (`buf`, as long as the request's data) into guest memory.
pub(crate) fn scatter(mem: &GuestMemoryMmap, req: &Request, buf: &[u8]) -> bool {
    let mut at = 0;
    for s in &req.data {
        let n = s.len as usize;
        let Some(part) = buf.get(at..at + n) else {
            return false;
        };
        if mem.write_slice(part, s.addr).is_err() {
            return false;
        }
        at += n;
    }
    true
}

/// Copies a write's data out of guest memory into `buf`, as long as the data.
pub(crate) fn gather(mem: &GuestMemoryMmap, req: &Request, buf: &mut [u8]) -> bool {
    let mut at = 0;
    for s in &req.data {
        let n = s.len as usize;
        let Some(part) = buf.get_mut(at..at + n) else {
            return false;
        };
        if mem.read_slice(part, s.addr).is_err() {
            return false;
        }
        at += n;
    }
    true
}

/// A write done: made durable first when the guest has no write cache.
pub(crate) fn durable(t: &Target<'_>, req: &Request) -> Outcome {
    if !t.writeback {
        if let Err(e) = t.device.flush() {
            (t.log)(&format!(
                "a write through at sector {} failed: {e}",
                req.sector
            ));
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        }
    }
    Outcome::ok(0)
}

/// A discard or write-zeroes: its segments (`struct virtio_blk_discard_write_zeroes`)
/// checked whole before any is carried out.
fn zero(t: &Target<'_>, mem: &GuestMemoryMmap, req: &Request) -> Outcome {
    let discard = req.kind == Kind::Discard;
    if t.config.options.read_only || (discard && t.config.options.discard != DiscardMode::Unmap) {
        return Outcome::status(VIRTIO_BLK_S_UNSUPP);
    }
    let bytes: u64 = req.data.iter().map(|s| u64::from(s.len)).sum();
    if req.data.iter().any(|s| s.writable)
        || bytes == 0
        || bytes % 16 != 0
        || bytes / 16 > u64::from(MAX_ZERO_SEGMENTS)
    {
        return Outcome::status(VIRTIO_BLK_S_UNSUPP);
    }
    let mut raw = vec![0u8; bytes as usize];
    let mut at = 0;
    for s in &req.data {
        let n = s.len as usize;
        if mem.read_slice(&mut raw[at..at + n], s.addr).is_err() {
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        }
        at += n;
    }
    let mut ranges = Vec::with_capacity(raw.len() / 16);
    for seg in raw.chunks_exact(16) {
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&seg[..8]);
        let sector = u64::from_le_bytes(sector);
        let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Outcome::status(VIRTIO_BLK_S_UNSUPP);
        }
        if sectors > MAX_ZERO_SECTORS
            || sector
                .checked_add(u64::from(sectors))
                .is_none_or(|end| end > t.config.capacity_sectors)
        {
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        }
        ranges.push((sector * SECTOR, u64::from(sectors) * SECTOR));
    }
    for (offset, len) in ranges {
        let done = if discard {
            t.device.discard(offset, len)
        } else {
            // The device leaves zeros in place of whole clusters (freeing them where it
            // may) whatever the UNMAP flag says: reads of the range see zeros either way.
            t.device.write_zeroes(offset, len)
        };
        if let Err(e) = done {
            let what = if discard {
                "a discard"
            } else {
                "a write of zeroes"
            };
            (t.log)(&format!("{what} at byte {offset} failed: {e}"));
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        }
    }
    if discard {
        Outcome::ok(0)
    } else {
        durable(t, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BlkOptions;
    use crate::request::Segment;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn target<'a>(dev: &'a dyn BlockDevice, cfg: &'a DeviceConfig) -> Target<'a> {
        Target {
            device: dev,
            config: cfg,
            writeback: true,
            log: |_| {},
        }
    }

    fn device(size: u64) -> (tempfile::TempDir, qed::Image) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qed");
        qed::Image::create(&path, &qed::CreateOptions::new(size)).unwrap();
        let img = qed::Image::open(&path, &qed::OpenOptions::default()).unwrap();
        (dir, img)
    }

    fn config(dev: &qed::Image, options: BlkOptions) -> DeviceConfig {
        DeviceConfig {
            capacity_sectors: dev.size() / SECTOR,
            options,
        }
    }

    fn req(kind: Kind, sector: u64, data: Vec<Segment>) -> Request {
        Request {
            kind,
            sector,
            data,
            status: GuestAddress(0xfff00),
        }
    }

    fn seg(addr: u64, len: u32, writable: bool) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    #[test]
    fn writes_and_reads_go_between_guest_memory_and_the_image() {
        let (_d, dev) = device(1 << 20);
        let cfg = config(&dev, BlkOptions::default());
        let t = target(&dev, &cfg);
        let m = mem();
        m.write_slice(&[7u8; 4096], GuestAddress(0x1000)).unwrap();
        m.write_slice(&[9u8; 512], GuestAddress(0x3000)).unwrap();
        let w = req(
            Kind::Write,
            8,
            vec![seg(0x1000, 4096, false), seg(0x3000, 512, false)],
        );
        assert_eq!(execute(&t, &m, &w), Outcome::ok(0));
        let r = req(Kind::Read, 8, vec![seg(0x8000, 4608, true)]);
        assert_eq!(execute(&t, &m, &r), Outcome::ok(4608));
        let mut back = vec![0u8; 4608];
        m.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 7) && back[4096..].iter().all(|&b| b == 9));
    }

    #[test]
    fn bad_requests_get_an_error_status_and_touch_nothing() {
        let (_d, dev) = device(1 << 20);
        let cfg = config(&dev, BlkOptions::default());
        let t = target(&dev, &cfg);
        let m = mem();
        let ioerr = Outcome::status(VIRTIO_BLK_S_IOERR);
        let cases = [
            (
                "past the end",
                req(Kind::Read, 2047, vec![seg(0, 1024, true)]),
            ),
            (
                "sector overflow",
                req(Kind::Read, u64::MAX, vec![seg(0, 512, true)]),
            ),
            (
                "not whole sectors",
                req(Kind::Write, 0, vec![seg(0, 100, false)]),
            ),
            (
                "outside memory",
                req(Kind::Read, 0, vec![seg(1 << 20, 512, true)]),
            ),
            (
                "straddling memory's end",
                req(Kind::Read, 0, vec![seg((1 << 20) - 512, 1024, true)]),
            ),
            (
                "wrong direction",
                req(Kind::Read, 0, vec![seg(0, 512, false)]),
            ),
            ("no data", req(Kind::Write, 0, vec![])),
        ];
        for (why, r) in cases {
            assert_eq!(execute(&t, &m, &r), ioerr, "{why}");
        }
        let huge: Vec<_> = (0..40).map(|_| seg(0, 1 << 20, false)).collect();
        assert_eq!(
            execute(&t, &m, &req(Kind::Write, 0, huge)),
            ioerr,
            "too large"
        );
        assert_eq!(
            execute(&t, &m, &req(Kind::Other(99), 0, vec![])),
            Outcome::status(VIRTIO_BLK_S_UNSUPP)
        );
        let mut all = vec![0u8; 1 << 20];
        dev.read_at(&mut all, 0).unwrap();
        assert!(all.iter().all(|&b| b == 0), "nothing was written");
    }

    #[test]
    fn write_zeroes_and_discard_check_every_segment_first() {
        let (_d, dev) = device(1 << 20);
        dev.write_at(&[5u8; 1 << 20], 0).unwrap();
        let cfg = config(
            &dev,
            BlkOptions {
                discard: DiscardMode::Unmap,
                ..BlkOptions::default()
            },
        );
        let t = target(&dev, &cfg);
        let m = mem();
        let put = |at: u64, sector: u64, n: u32, flags: u32| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&sector.to_le_bytes());
            b[8..12].copy_from_slice(&n.to_le_bytes());
            b[12..].copy_from_slice(&flags.to_le_bytes());
            m.write_slice(&b, GuestAddress(at)).unwrap();
        };
        put(0, 0, 128, 0);
        put(16, 4096, 8, 0);
        let bad = req(Kind::WriteZeroes, 0, vec![seg(0, 32, false)]);
        assert_eq!(execute(&t, &m, &bad), Outcome::status(VIRTIO_BLK_S_IOERR));
        let mut first = vec![0u8; 512];
        dev.read_at(&mut first, 0).unwrap();
        assert!(
            first.iter().all(|&b| b == 5),
            "the good segment was not carried out alone"
        );
        put(16, 256, 8, 0);
        assert_eq!(execute(&t, &m, &bad), Outcome::ok(0));
        dev.read_at(&mut first, 0).unwrap();
        assert!(first.iter().all(|&b| b == 0));
        put(0, 512, 128, 2);
        let flagged = req(Kind::Discard, 0, vec![seg(0, 16, false)]);
        assert_eq!(
            execute(&t, &m, &flagged),
            Outcome::status(VIRTIO_BLK_S_UNSUPP)
        );
        put(0, 512, 128, 0);
        assert_eq!(execute(&t, &m, &flagged), Outcome::ok(0));
        let mut d = vec![1u8; 65536];
        dev.read_at(&mut d, 512 * 512).unwrap();
        assert!(
            d.iter().all(|&b| b == 0),
            "a discarded cluster reads as zeros"
        );
    }
}
