//! The backend driven through the vhost-user protocol by the `vhost` crate's frontend,
//! with split virtqueues laid out by hand in memfd-backed "guest" memory: well-formed
//! requests, and the broken chains, out-of-range requests and lying memory tables a
//! guest or a client may send.

use std::fs::File;
use std::os::unix::io::FromRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 16;
const MEM_SIZE: usize = 1 << 20;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn memfd_mem() -> GuestMemoryMmap {
    memfd_mem_of(MEM_SIZE as u64, MEM_SIZE)
}

/// Guest memory of `size` bytes mapped from a memfd of `file_len` bytes.
fn memfd_mem_of(file_len: u64, size: usize) -> GuestMemoryMmap {
    // SAFETY: plain syscall, name is NUL-terminated.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh, owned descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(file_len).unwrap();
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

struct Vq<'a> {
    mem: &'a GuestMemoryMmap,
    kick: EventFd,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Vq<'_> {
    fn desc(&mut self, addr: u64, len: u32, flags: u16, next: Option<u16>) -> u16 {
        let i = self.next_desc % QSIZE;
        self.next_desc += 1;
        let base = GuestAddress(DESC + 16 * i as u64);
        let next = next.unwrap_or(if flags & F_NEXT != 0 {
            (i + 1) % QSIZE
        } else {
            0
        });
        self.mem.write_obj(addr, base).unwrap();
        self.mem.write_obj(len, base.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, base.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, base.unchecked_add(14)).unwrap();
        i
    }
    /// Publish `head`, kick, wait for the used ring. Returns used.len.
    fn submit(&mut self, head: u16) -> u32 {
        let slot = self.avail_idx % QSIZE;
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot as u64))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if used != self.used_seen {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "backend did not complete request"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let slot = self.used_seen % QSIZE;
        self.used_seen = self.used_seen.wrapping_add(1);
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(USED + 4 + 8 * slot as u64))
            .unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(USED + 8 + 8 * slot as u64))
            .unwrap();
        assert_eq!(id, head as u32);
        len
    }
    fn hdr(&self, t: u32, sector: u64) {
        self.mem.write_obj(t.to_le(), GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(HDR + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }
    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
}

/// A served image and a frontend connected to it, its queue 0 set up.
struct Rig {
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    image: std::path::PathBuf,
    stopper: qed_vhost::Stopper,
    server: Option<std::thread::JoinHandle<std::io::Result<Vec<u64>>>>,
}

impl Rig {
    fn new(options: qed_vhost::BlkOptions) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.qed");
        qed::Image::create(&image, &qed::CreateOptions::new(1 << 20)).unwrap();
        let dev = qed::Image::open(&image, &qed::OpenOptions::default()).unwrap();
        let sock = dir.path().join("sock");
        let server = qed_vhost::Server::bind(&sock, Arc::new(dev), options).unwrap();
        let stopper = server.stopper();
        let server = Some(std::thread::spawn(move || server.run()));
        Rig {
            _dir: dir,
            sock,
            image,
            stopper,
            server,
        }
    }

    fn stop(&mut self) {
        self.stopper.stop();
        if let Some(s) = self.server.take() {
            s.join().unwrap().unwrap();
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
    }
}

/// Negotiates as QEMU does (without EVENT_IDX, to keep the ring simple) and sets up
/// queue 0 in `mem`; returns the frontend, and the queue's kick and call.
fn attach(sock: &Path, mem: &GuestMemoryMmap) -> (Frontend, EventFd, EventFd) {
    let mut fe = connect(sock);
    let features = fe.get_features().unwrap();
    fe.set_owner().unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
    fe.set_protocol_features(proto).unwrap();
    let (_, cfg) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        2048,
        "capacity"
    );
    fe.set_features(features & !(1 << 29)).unwrap();
    let region = mem.find_region(GuestAddress(0)).unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
    let hva = info.userspace_addr;
    fe.set_mem_table(&[info]).unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            // A frontend gives its own addresses; the table maps them.
            desc_table_addr: hva + DESC,
            used_ring_addr: hva + USED,
            avail_ring_addr: hva + AVAIL,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    (fe, kick, call)
}

fn zero_seg(mem: &GuestMemoryMmap, at: u64, sector: u64, sectors: u32, flags: u32) {
    mem.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(sectors.to_le(), GuestAddress(at + 8))
        .unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
}

#[test]
fn requests_good_and_broken_through_the_protocol() {
    let mut rig = Rig::new(qed_vhost::BlkOptions {
        discard: qed::DiscardMode::Unmap,
        serial: "disk-serial-1".into(),
        ..Default::default()
    });
    let mem = memfd_mem();
    let (fe, kick, _call) = attach(&rig.sock, &mem);
    let mut vq = Vq {
        mem: &mem,
        kick,
        next_desc: 0,
        avail_idx: 0,
        used_seen: 0,
    };
    let (ok, ioerr, unsupp) = (0u8, 1u8, 2u8);

    // A write of 4 KiB at sector 8, read back.
    mem.write_slice(&[0xabu8; 4096], GuestAddress(DATA))
        .unwrap();
    vq.hdr(1, 8);
    let h = vq.desc(HDR, 16, F_NEXT, None);
    vq.desc(DATA, 4096, F_NEXT, None);
    vq.desc(STATUS, 1, F_WRITE, None);
    assert_eq!(vq.submit(h), 1);
    assert_eq!(vq.status(), ok);
    mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    vq.hdr(0, 8);
    let h = vq.desc(HDR, 16, F_NEXT, None);
    vq.desc(DATA, 4096, F_NEXT | F_WRITE, None);
    vq.desc(STATUS, 1, F_WRITE, None);
    assert_eq!(vq.submit(h), 4097);
    assert_eq!(vq.status(), ok);
    let mut back = [0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0xab));

    // Data outside guest memory, straddling its end, or of a length no guest has.
    for (addr, len) in [
        (0x4000_0000u64, 512u32),
        (MEM_SIZE as u64 - 256, 512),
        (DATA, !511u32),
    ] {
        vq.hdr(0, 0);
        let h = vq.desc(HDR, 16, F_NEXT, None);
        vq.desc(addr, len, F_NEXT | F_WRITE, None);
        vq.desc(STATUS, 1, F_WRITE, None);
        assert_eq!(vq.submit(h), 1, "data at {addr:#x}+{len}");
        assert_eq!(vq.status(), ioerr, "data at {addr:#x}+{len}");
    }
    // Past the end of the disk, and a sector that overflows.
    for sector in [2047u64, u64::MAX - 1] {
        vq.hdr(0, sector);
        let h = vq.desc(HDR, 16, F_NEXT, None);
        vq.desc(DATA, 1024, F_NEXT | F_WRITE, None);
        vq.desc(STATUS, 1, F_WRITE, None);
        assert_eq!(vq.submit(h), 1);
        assert_eq!(vq.status(), ioerr, "sector {sector}");
    }
    // A write whose data the device would write into: the wrong way round.
    vq.hdr(1, 0);
    let h = vq.desc(HDR, 16, F_NEXT, None);
    vq.desc(DATA, 512, F_NEXT | F_WRITE, None);
    vq.desc(STATUS, 1, F_WRITE, None);
    assert_eq!(vq.submit(h), 1);
    assert_eq!(vq.status(), ioerr);

    // Chains that are no request: completed empty, the ring goes on.
    let h = vq.desc(HDR, 16, F_NEXT, Some(vq.next_desc % QSIZE));
    assert_eq!(vq.submit(h), 0, "a chain looping on itself");
    let h = vq.desc(HDR, 16, F_NEXT, Some(1000));
    assert_eq!(vq.submit(h), 0, "a next past the table");
    let h = vq.desc(0x4000_0000, 16, F_NEXT, None);
    vq.desc(STATUS, 1, F_WRITE, None);
    assert_eq!(vq.submit(h), 0, "a header outside memory");
    let h = vq.desc(HDR, 8, F_NEXT, None);
    vq.desc(STATUS, 1, F_WRITE, None);
    assert_eq!(vq.submit(h), 0, "a short header");
    vq.hdr(0, 0);
    let h = vq.desc(HDR, 16, F_NEXT, None);
    vq.desc(STATUS, 1, 0, None);
    assert_eq!(vq.submit(h), 0, "a status the device may not write");

    // An unknown type.
    vq.hdr(0x77, 0);
    let h = vq.desc(HDR, 16, F_NEXT, None);
    vq.desc(STATUS, 1, F_WRITE, None);
    assert_eq!(vq.submit(h), 1);
    assert_eq!(vq.status(), unsupp);

    // Write-zeroes over the data, read back as zeros.
    vq.hdr(13, 0);
    zero_seg(&mem, DATA, 8, 8, 0);
    let h = vq.desc(HDR, 16, F_NEXT, None);
    vq.desc(DATA, 16, F_NEXT, None);
    vq.desc(STATUS, 1, F_WRITE, None);
    assert_eq!(vq.submit(h), 1);
    assert_eq!(vq.status(), ok);
    mem.write_slice(&[0x55u8; 4096], GuestAddress(DATA))
        .unwrap();
    vq.hdr(0, 8);
    let h = vq.desc(HDR, 16, F_NEXT, None);
    vq.desc(DATA, 4096, F_NEXT | F_WRITE, None);
    vq.desc(STATUS, 1, F_WRITE, None);
    assert_eq!(vq.submit(h), 4097);
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&b| b == 0));

    // Discards: a flag set, a ragged segment list, one past the end; then a good one.
    for (flags, len, sector, want) in [
        (1u32, 16u32, 0u64, unsupp),
        (0, 20, 0, unsupp),
        (0, 16, 2047, ioerr),
        (0, 16, 0, ok),
    ] {
        vq.hdr(11, 0);
        zero_seg(&mem, DATA, sector, 2, flags);
        let h = vq.desc(HDR, 16, F_NEXT, None);
        vq.desc(DATA, len, F_NEXT, None);
        vq.desc(STATUS, 1, F_WRITE, None);
        assert_eq!(vq.submit(h), 1);
        assert_eq!(
            vq.status(),
            want,
            "discard flags={flags} len={len} sector={sector}"
        );
    }

    // Still serving: GET_ID and FLUSH.
    vq.hdr(8, 0);
    let h = vq.desc(HDR, 16, F_NEXT, None);
    vq.desc(DATA, 20, F_NEXT | F_WRITE, None);
    vq.desc(STATUS, 1, F_WRITE, None);
    assert_eq!(vq.submit(h), 21);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..13], b"disk-serial-1");
    assert!(id[13..].iter().all(|&b| b == 0));
    vq.hdr(4, 0);
    let h = vq.desc(HDR, 16, F_NEXT, None);
    vq.desc(STATUS, 1, F_WRITE, None);
    assert_eq!(vq.submit(h), 1);
    assert_eq!(vq.status(), ok);

    // Stopping the ring as QEMU does: every request taken was completed.
    assert_eq!(fe.get_vring_base(0).unwrap(), u32::from(vq.avail_idx));
    drop(fe);
    rig.stop();
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qed"])
        .arg(&rig.image)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn a_lying_memory_table_is_refused_and_the_next_frontend_served() {
    let rig = Rig::new(qed_vhost::BlkOptions::default());
    // A region larger than the file behind it: touching its end would kill the
    // process that mapped it.
    let liar = memfd_mem_of(4096, MEM_SIZE);
    let mut fe = connect(&rig.sock);
    let features = fe.get_features().unwrap();
    fe.set_owner().unwrap();
    let proto = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(proto).unwrap();
    fe.set_features(features & !(1 << 29)).unwrap();
    let region = liar.find_region(GuestAddress(0)).unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
    let refused = fe.set_mem_table(&[info]).is_err() || fe.get_features().is_err();
    assert!(refused, "a region past the end of its file is refused");
    drop(fe);

    // The server lives on, and serves the next frontend.
    let mem = memfd_mem();
    let (_fe, kick, _call) = attach(&rig.sock, &mem);
    let mut vq = Vq {
        mem: &mem,
        kick,
        next_desc: 0,
        avail_idx: 0,
        used_seen: 0,
    };
    vq.hdr(4, 0);
    let h = vq.desc(HDR, 16, F_NEXT, None);
    vq.desc(STATUS, 1, F_WRITE, None);
    assert_eq!(vq.submit(h), 1);
    assert_eq!(vq.status(), 0);
}

#[test]
fn a_frontend_that_comes_back_finds_what_it_wrote() {
    let mut rig = Rig::new(qed_vhost::BlkOptions::default());
    for round in 0..3u8 {
        let mem = memfd_mem();
        let (_fe, kick, _call) = attach(&rig.sock, &mem);
        let mut vq = Vq {
            mem: &mem,
            kick,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        if round > 0 {
            vq.hdr(0, 16);
            let h = vq.desc(HDR, 16, F_NEXT, None);
            vq.desc(DATA, 512, F_NEXT | F_WRITE, None);
            vq.desc(STATUS, 1, F_WRITE, None);
            assert_eq!(vq.submit(h), 513);
            let mut b = [0u8; 512];
            mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
            assert!(
                b.iter().all(|&x| x == round),
                "round {round} reads round {}'s write",
                round - 1
            );
        }
        mem.write_slice(&[round + 1; 512], GuestAddress(DATA))
            .unwrap();
        vq.hdr(1, 16);
        let h = vq.desc(HDR, 16, F_NEXT, None);
        vq.desc(DATA, 512, F_NEXT, None);
        vq.desc(STATUS, 1, F_WRITE, None);
        assert_eq!(vq.submit(h), 1);
        assert_eq!(vq.status(), 0);
        // The frontend goes away without stopping its ring, as a QEMU killed does.
    }
    rig.stop();
}

fn connect(sock: &Path) -> Frontend {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Frontend::connect(sock, 1) {
            Ok(f) => return f,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
}

/// QEMU negotiates twice: once with no guest features when it starts the device, then
/// with the guest driver's. The write cache the guest then reads is on, as the driver
/// negotiated CONFIG_WCE; and a guest that writes `wce` turns it off.
#[test]
fn the_write_cache_follows_the_last_negotiation_and_the_guest() {
    let rig = Rig::new(qed_vhost::BlkOptions::default());
    let mut fe = connect(&rig.sock);
    let features = fe.get_features().unwrap();
    fe.set_owner().unwrap();
    let proto = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(proto).unwrap();
    let wce = |fe: &mut Frontend| {
        let (_, cfg) = fe
            .get_config(32, 1, VhostUserConfigFlags::WRITABLE, &[0u8; 1])
            .unwrap();
        cfg[0]
    };
    fe.set_features(features & (1 << 30 | 1 << 32)).unwrap();
    fe.set_features(features & !(1 << 29)).unwrap();
    assert_eq!(
        wce(&mut fe),
        1,
        "the guest's driver negotiated CONFIG_WCE: writeback"
    );
    fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(wce(&mut fe), 0, "the guest turned it off");
}
