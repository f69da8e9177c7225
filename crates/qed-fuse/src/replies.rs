//! Reads and writes carried out on the calling thread (a worker), and answered.

use crate::ops;
use crate::tally::Tally;
use fuser::{ReplyData, ReplyWrite};

/// Reads `len` bytes at `offset` and answers with them.
pub(crate) fn read_and_reply(
    tally: &Tally,
    dev: &dyn qed::BlockDevice,
    offset: u64,
    len: u32,
    reply: ReplyData,
) {
    match ops::read(dev, offset, len) {
        Ok(buf) => reply.data(&buf),
        Err(f) => reply.error(tally.errno(f)),
    }
}

/// Writes `data` at `offset` (flushing after it with `sync`) and answers.
pub(crate) fn write_and_reply(
    tally: &Tally,
    dev: &dyn qed::BlockDevice,
    offset: u64,
    data: &[u8],
    sync: bool,
    reply: ReplyWrite,
) {
    let r = ops::write(dev, false, offset, data, sync);
    tally.wrote();
    match r {
        Ok(n) => reply.written(n),
        Err(f) => reply.error(tally.errno(f)),
    }
}
