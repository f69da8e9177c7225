//! What the handshake agrees on and transmission abides by: structured replies or
//! extended headers, and the metadata contexts selected.

/// A metadata context a client can select for NBD_CMD_BLOCK_STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: hole and zero flags.
    Allocation,
    /// `qemu:allocation-depth`: which layer of the backing chain supplies the data.
    AllocationDepth,
}

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            MetaContext::Allocation => "base:allocation",
            MetaContext::AllocationDepth => "qemu:allocation-depth",
        }
    }

    /// The context's id in replies.
    pub fn id(self) -> u32 {
        match self {
            MetaContext::Allocation => 1,
            MetaContext::AllocationDepth => 2,
        }
    }

    /// The contexts a query names; `listing` allows the `ns:` wildcard.
    pub(crate) fn matching(query: &[u8], listing: bool) -> Vec<MetaContext> {
        match query {
            b"base:allocation" => vec![MetaContext::Allocation],
            b"qemu:allocation-depth" => vec![MetaContext::AllocationDepth],
            b"base:" if listing => vec![MetaContext::Allocation],
            b"qemu:" if listing => vec![MetaContext::AllocationDepth],
            _ => Vec::new(),
        }
    }
}

/// What the handshake agreed on.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Structured replies were negotiated (or extended headers, which include them).
    pub structured: bool,
    /// Extended headers were negotiated: 32-byte requests with 64-bit lengths, and
    /// only extended reply chunks.
    pub extended: bool,
    /// Selected metadata contexts.
    pub contexts: Vec<MetaContext>,
}
