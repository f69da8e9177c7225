//! `qed`: create, inspect, check and edit QED images, in the manner of qemu-img and
//! qemu-io.

mod cmd;
mod units;

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

/// Work with QED (QEMU Enhanced Disk) images.
#[derive(Parser)]
#[command(name = "qed", version, about, propagate_version = true)]
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Create(a) => cmd::create::run(a),
        Command::Info(a) => cmd::info::run(a),
        Command::Map(a) => cmd::map::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Io(a) => cmd::io::run(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qed: {e:#}");
            ExitCode::from(1)
        }
    }
}
