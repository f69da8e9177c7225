//! A request as the guest framed it: the descriptors of one chain, read into what the
//! device is asked to do. Nothing here trusts the guest: every address is checked
//! against the memory it gave, and a chain that is not a request is refused.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Bytes of the request header (`struct virtio_blk_outhdr`).
const HEADER: u32 = 16;

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// A type this device does not know: answered as unsupported.
    Other(u32),
}

/// A run of guest memory a request reads from or writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) addr: GuestAddress,
    pub(crate) len: u32,
    /// Whether the device writes it (the guest reads it): a read's data.
    pub(crate) writable: bool,
}

/// One request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) kind: Kind,
    pub(crate) sector: u64,
    pub(crate) data: Vec<Segment>,
    /// Where the status byte goes.
    pub(crate) status: GuestAddress,
}

/// Reads the request the chain `descs` frames: the header at the start of the first
/// descriptor (device-readable), the status byte at the end of the last
/// (device-writable), the data in between. Bytes of the first descriptor past the
/// header, and of the last before the status, are data too, so that a guest framing
/// them together is served. `Err` names why a chain is no request: it is completed
/// without a status.
pub(crate) fn parse(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<Request, &'static str> {
    let (first, rest) = descs.split_first().ok_or("an empty chain")?;
    if first.is_write_only() || first.len() < HEADER {
        return Err("the first descriptor holds no request header");
    }
    let last = rest.last().unwrap_or(first);
    if !last.is_write_only() || last.len() == 0 {
        return Err("the last descriptor has no room for the status");
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .filter(|&a| GuestMemoryBackend::check_range(mem, a, 1))
        .ok_or("the status byte lies outside guest memory")?;
    let mut header = [0u8; HEADER as usize];
    mem.read_slice(&mut header, first.addr())
        .map_err(|_| "the request header lies outside guest memory")?;
    let kind = match u32::from_le_bytes([header[0], header[1], header[2], header[3]]) {
        VIRTIO_BLK_T_IN => Kind::Read,
        VIRTIO_BLK_T_OUT => Kind::Write,
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_GET_ID => Kind::GetId,
        VIRTIO_BLK_T_DISCARD => Kind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
        other => Kind::Other(other),
    };
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    let mut data = Vec::with_capacity(descs.len());
    if first.len() > HEADER && rest.is_empty() {
        return Err("the header and the status share one descriptor");
    }
    if first.len() > HEADER {
        data.push(Segment {
            addr: first.addr().unchecked_add(u64::from(HEADER)),
            len: first.len() - HEADER,
            writable: false,
        });
    }
    if let Some((_, middle)) = rest.split_last() {
        data.extend(middle.iter().map(|d| Segment {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        }));
        if last.len() > 1 {
            data.push(Segment {
                addr: last.addr(),
                len: last.len() - 1,
                writable: true,
            });
        }
    }
    data.retain(|s| s.len > 0);
    Ok(Request {
        kind,
        sector: u64::from_le_bytes(sector),
        data,
        status,
    })
}
