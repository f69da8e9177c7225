//! `-U` / `--force-share`, as qemu-img offers it on the commands that only read.

use qed::OpenOptions;

/// Whether a read-only command opens its images sharing them with writers.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ShareArgs {
    /// Open read-only without waiting for writers: the image may be in use by another
    /// process (qed serve, qemu-nbd, a VM), and what is read may be inconsistent while it
    /// writes.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

impl ShareArgs {
    /// `opts`, sharing the files with writers when asked.
    pub fn apply(&self, opts: OpenOptions) -> OpenOptions {
        OpenOptions {
            force_share: self.force_share,
            ..opts
        }
    }
}
