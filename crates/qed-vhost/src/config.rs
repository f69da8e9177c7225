//! What the device says of itself: its virtio features and its configuration space.

use qed::DiscardMode;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Bytes of a virtio-blk sector: every offset and length in a request counts these.
pub(crate) const SECTOR: u64 = 512;
/// Entries of each virtqueue at most.
pub(crate) const QUEUE_SIZE: usize = 1024;
/// Data descriptors of one request at most (`seg_max`).
pub(crate) const SEG_MAX: u32 = 254;
/// Bytes of one data descriptor at most (`size_max`).
pub(crate) const SIZE_MAX: u32 = 1 << 20;
/// Bytes of one read or write at most: larger requests fail, so that no request makes
/// this process allocate without bound. Linux asks for at most a few MiB.
pub(crate) const MAX_REQUEST: u64 = 32 << 20;
/// Sectors one discard or write-zeroes segment may cover, and segments per request.
pub(crate) const MAX_ZERO_SECTORS: u32 = 1 << 23;
pub(crate) const MAX_ZERO_SEGMENTS: u32 = 16;

/// How a vhost-user-blk export behaves.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Virtqueues the guest may use (`num_queues`); one per guest vCPU is what QEMU
    /// asks by default.
    pub num_queues: usize,
    /// Refuse writes (the guest sees a read-only disk).
    pub read_only: bool,
    /// What a guest's discard does: nothing, or free the clusters.
    pub discard: DiscardMode,
    /// The logical block size the guest sees, in bytes (512 or 4096).
    pub logical_block_size: u32,
    /// The serial number the guest reads (at most 20 bytes are used).
    pub serial: String,
    /// The granularity discards free space in (the image's cluster size), in bytes: the
    /// guest aligns its discards to it.
    pub discard_granularity: u32,
    /// Threads carrying out requests, shared by every queue.
    pub workers: usize,
    /// Where the backend's one-line notices go (a request the device failed).
    pub log: fn(&str),
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            num_queues: 1,
            read_only: false,
            discard: DiscardMode::Ignore,
            logical_block_size: 512,
            serial: String::new(),
            discard_granularity: 64 << 10,
            workers: 16,
            log: |line| eprintln!("{line}"),
        }
    }
}

/// The device's facts, fixed while it is served.
#[derive(Debug, Clone)]
pub(crate) struct DeviceConfig {
    pub(crate) capacity_sectors: u64,
    pub(crate) options: BlkOptions,
}

impl DeviceConfig {
    /// The virtio features offered.
    pub(crate) fn features(&self) -> u64 {
        let bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ];
        let mut f = bits.iter().fold(0u64, |f, &b| f | (1u64 << b));
        if self.options.discard == DiscardMode::Unmap {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if self.options.num_queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        if self.options.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    /// The configuration space (`struct virtio_blk_config`, little-endian), up to
    /// `write_zeroes_may_unmap`, with `writeback` as the write cache's state.
    pub(crate) fn space(&self, writeback: bool) -> [u8; 60] {
        let mut c = [0u8; 60];
        let block = self.options.logical_block_size.max(SECTOR as u32);
        let put32 =
            |c: &mut [u8; 60], at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        put32(&mut c, 8, SIZE_MAX);
        put32(&mut c, 12, SEG_MAX);
        put32(&mut c, 20, block);
        // Topology: a cluster is the optimal transfer (a smaller write to an unallocated
        // one fills around it); the physical block stays the logical one, which any
        // file system takes.
        let cluster = self.options.discard_granularity.max(block);
        let per_block = (cluster / block).max(1);
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        put32(&mut c, 28, per_block);
        c[32] = u8::from(writeback);
        c[34..36].copy_from_slice(&(self.options.num_queues as u16).to_le_bytes());
        put32(&mut c, 36, MAX_ZERO_SECTORS);
        put32(&mut c, 40, MAX_ZERO_SEGMENTS);
        put32(&mut c, 44, cluster / SECTOR as u32);
        put32(&mut c, 48, MAX_ZERO_SECTORS);
        put32(&mut c, 52, MAX_ZERO_SEGMENTS);
        c[56] = u8::from(self.options.discard == DiscardMode::Unmap);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_space_carries_capacity_limits_and_cache_state() {
        let cfg = DeviceConfig {
            capacity_sectors: 2048,
            options: BlkOptions {
                num_queues: 2,
                discard: DiscardMode::Unmap,
                ..BlkOptions::default()
            },
        };
        let s = cfg.space(true);
        assert_eq!(u64::from_le_bytes(s[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(s[20..24].try_into().unwrap()), 512);
        assert_eq!(
            u32::from_le_bytes(s[28..32].try_into().unwrap()),
            128,
            "a cluster"
        );
        assert_eq!(s[32], 1);
        assert_eq!(u16::from_le_bytes(s[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(s[44..48].try_into().unwrap()), 128);
        assert_eq!(s[56], 1);
        assert_eq!(cfg.space(false)[32], 0);
        let f = cfg.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    }
}
