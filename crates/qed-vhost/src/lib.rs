#![warn(missing_docs)]
//! A vhost-user-blk backend over the `qed` library's devices: a virtual machine's
//! virtio-blk queues, in memory it shares with this process, processed against an image
//! directly, so that a request's data moves once, between the guest's memory and the
//! image.
//!
//! Built on the rust-vmm crates (`vhost-user-backend` for the protocol, `virtio-queue`
//! for the rings, `vm-memory` for the guest's memory). QEMU connects to the socket with
//! `-chardev socket,path=SOCKET[,reconnect-ms=N] -device vhost-user-blk-pci,chardev=...`
//! and guest memory shared with `-object memory-backend-memfd,share=on`.
//!
//! ```no_run
//! use qed_vhost::{BlkOptions, Server};
//! use std::sync::Arc;
//!
//! let image = qed::Image::open("disk.qed", &qed::OpenOptions::default())?;
//! let server = Server::bind("/tmp/disk.sock", Arc::new(image), BlkOptions::default())?;
//! server.run()?; // until server.stopper() is used
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod backend;
mod config;
mod execute;
mod job;
mod request;
mod ring;
mod server;
mod shared;

pub use config::BlkOptions;
pub use server::{Server, Stopper};
