#![warn(missing_docs)]
//! A control socket for qed's exports, and the jobs it runs.
//!
//! A long operation (a stream, a compaction, a defragmentation) runs as a job: a closure on a
//! thread of its own, given a [`JobControl`] to report progress on and to see a cancel
//! through. A [`Jobs`] registry gives each an id and keeps its status and outcome.
//! [`ControlServer`] listens on a Unix socket and answers QMP-shaped JSON, one value a
//! line, from the [`Commands`] table: the job commands, and those an export adds to
//! start its jobs ([`add_stream_command`], [`add_reorganize_commands`]). Nothing here knows NBD or FUSE.
//! Commands and the [`Client`] take [`Argument`]s and give a [`Return`]: the JSON they
//! travel as is this crate's business, and no JSON library's type is part of its API.
//!
//! The protocol, as QEMU's QMP shapes it:
//!
//! - on connect the server sends `{"QMP":{"version":{...},"capabilities":[]}}`;
//! - each request is a line `{"execute":NAME,"arguments":{...},"id":ANY}` (`arguments`
//!   and `id` optional); `qmp_capabilities` is accepted but not required first;
//! - each gets one reply line, `{"return":VALUE}` or
//!   `{"error":{"class":"GenericError"|"CommandNotFound","desc":TEXT}}`, with the
//!   request's `id` echoed; nothing else is ever sent (no events);
//! - a line longer than [`MAX_LINE`] bytes gets an error and ends the connection; at most
//!   [`MAX_CONNECTIONS`] clients are served at once.
//!
//! ```no_run
//! use qed_control::{add_stream_command, Commands, ControlServer, Jobs, JobTarget};
//! use std::sync::Arc;
//!
//! let image = Arc::new(qed::Image::open("disk.qed", &qed::OpenOptions::default())?);
//! let jobs = Jobs::new();
//! let mut commands = Commands::new(jobs.clone());
//! add_stream_command(&mut commands, JobTarget::Image(image.clone()));
//! let control = ControlServer::start("disk.sock".as_ref(), Arc::new(commands))?;
//! // ... serve the image; at the end:
//! jobs.close();
//! jobs.wait();
//! control.stop();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod client;
mod commands;
mod connection;
mod error;
mod jobs;
mod line;
mod protocol;
mod reorganize;
mod server;
mod stream;
mod target;
mod values;

pub use client::{Client, ClientError};
pub use commands::{Arguments, Commands};
pub use connection::MAX_LINE;
pub use error::{ControlError, ErrorClass};
pub use jobs::{
    JobControl, JobEnd, JobInfo, JobResult, JobSpec, JobStatus, Jobs, CANCELLED, MAX_CONCLUDED,
    MAX_ID_LEN, MAX_RUNNING,
};
pub use reorganize::{
    add_reorganize_commands, compact_when_freed, freed_past, start_reorganize, Reorganize,
};
pub use server::{ControlServer, MAX_CONNECTIONS};
pub use stream::{add_stream_command, start_stream, StreamRequest};
pub use target::JobTarget;
pub use values::{Argument, Return};
