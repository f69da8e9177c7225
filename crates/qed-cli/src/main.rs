//! `qed`: create, inspect, check and edit QED images, in the manner of qemu-img and
//! qemu-io.

mod cmd;
mod context;
mod export;
mod geometry;
mod open;
mod outcome;
mod progress;
mod remote;
mod share;
mod units;
mod values;

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

/// Work with QED (QEMU Enhanced Disk) images.
#[derive(Parser)]
// A repeated single-valued option takes its last value, as qemu-img's getopt loop does
// (`-F qed -F raw` is raw); options that collect values (`io -c`) still collect them all.
#[command(
    name = "qed",
    version,
    about,
    propagate_version = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Output format of the inspecting commands, as qemu-img's `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Text for people.
    #[default]
    Human,
    /// JSON shaped as qemu-img prints it.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new image.
    Create(cmd::create::Args),
    /// Show information about an image.
    Info(cmd::info::Args),
    /// Show how an image's guest space is stored.
    Map(cmd::map::Args),
    /// Check an image's metadata for consistency.
    Check(cmd::check::Args),
    /// Run read, write and other commands on an image, as qemu-io.
    Io(cmd::io::Args),
    /// Copy an image into a new QED or raw image.
    Convert(cmd::convert::Args),
    /// Compare the contents of two images.
    Compare(cmd::compare::Args),
    /// Write an image's data into its backing file.
    Commit(cmd::commit::Args),
    /// Change an image's backing file.
    Rebase(cmd::rebase::Args),
    /// Copy what an image reads from its backing chain into it, then drop the backing file.
    Stream(cmd::stream::Args),
    /// Change an image's virtual size.
    Resize(cmd::resize::Args),
    /// Move clusters into free space and cut the file to what it holds.
    Compact(cmd::reorganize::Args),
    /// Lay an image's clusters out in guest order, tables together.
    Defrag(cmd::reorganize::Args),
    /// Compute the file size a QED image needs.
    Measure(cmd::measure::Args),
    /// Serve an image over NBD.
    Serve(Box<cmd::serve::Args>),
    /// Mount an image as a file (FUSE).
    Mount(cmd::mount::Args),
    /// Start, watch and cancel jobs in a running qed serve, through its control socket.
    Job(cmd::job::Args),
    /// Run a simple image benchmark, as qemu-img bench.
    Bench(cmd::bench::Args),
    /// Show or manage the cache on disk of remote images that the host's processes share.
    Cache(cmd::cache::Args),
}

/// A reader that stops early (`qed map | head`) closes stdout under us. Rust ignores
/// SIGPIPE (the servers need write errors, not a signal), so printing fails and panics;
/// end quietly instead, with the status a shell reports for a command SIGPIPE ended, as
/// qemu-img's end would be.
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.starts_with("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(128 + libc::SIGPIPE);
        }
        report(info)
    }));
}

/// Raises the soft limit on open files to the hard one, as QEMU does: a remote image's
/// cache on disk keeps its chunk files open, as many as a quarter of the limit, and an
/// export holds a descriptor per connection.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        // qemu-img's tools end a usage error with status 1; clap's 2 would read as
        // "corruptions found" from `check` and as a failed comparison's error from
        // `compare`. Help and version still end with 0.
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 })
    });
    qed::set_warning_handler(|m| eprintln!("qed: warning: {m}"));
    raise_open_file_limit();
    let result = match cli.command {
        Command::Create(a) => cmd::create::run(a),
        Command::Info(a) => cmd::info::run(a),
        Command::Map(a) => cmd::map::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Io(a) => cmd::io::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Commit(a) => cmd::commit::run(a),
        Command::Rebase(a) => cmd::rebase::run(a),
        Command::Stream(a) => cmd::stream::run(a),
        Command::Resize(a) => cmd::resize::run(a),
        Command::Compact(a) => cmd::reorganize::run(a, qed::Reorganization::Compact),
        Command::Defrag(a) => cmd::reorganize::run(a, qed::Reorganization::Defrag),
        Command::Measure(a) => cmd::measure::run(a),
        Command::Serve(a) => cmd::serve::run(*a),
        Command::Mount(a) => cmd::mount::run(a),
        Command::Job(a) => cmd::job::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Cache(a) => cmd::cache::run(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qed: {e:#}");
            ExitCode::from(1)
        }
    }
}
