#![warn(missing_docs)]
//! An NBD (Network Block Device) server over the `qed` library's devices.
//!
//! Fixed newstyle handshake with structured replies or extended headers (64-bit
//! lengths), metadata contexts (`base:allocation`, `qemu:allocation-depth`), and
//! transmission with many requests in flight per connection, replied to out of order as
//! they finish. TLS (NBD_OPT_STARTTLS)
//! with X.509 certificates or pre-shared keys, as qemu-nbd and nbdkit offer it.
//!
//! ```no_run
//! use qed_nbd::{Config, DiscardMode, Export, Listener, Server};
//! use std::sync::Arc;
//!
//! let image = qed::Image::open("disk.qed", &qed::OpenOptions::default())?;
//! let export = Export {
//!     device: Arc::new(image),
//!     name: "disk".into(),
//!     description: String::new(),
//!     read_only: false,
//!     discard: DiscardMode::Ignore,
//! };
//! let listener = std::net::TcpListener::bind("127.0.0.1:10809")?;
//! Server::new(export, Config::default()).run(Listener::Tcp(listener))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod commands;
mod connection;
mod errors;
mod export;
mod handshake;
mod intake;
mod outbox;
mod proto;
mod reader;
mod replies;
mod server;
mod session;
mod stream;
mod tls;
mod transmission;
mod transport;

pub use export::{DiscardMode, Export, MAX_PAYLOAD};
pub use server::{Config, Listener, Server};
pub use session::MetaContext;
pub use stream::Stream;
pub use tls::{Tls, TlsCredentials, TlsMode};
