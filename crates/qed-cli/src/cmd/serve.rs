//! `qed serve`: export an image over NBD, in the manner of qemu-nbd, or to a virtual
//! machine as a vhost-user-blk device, in the manner of qemu-storage-daemon.

use crate::export::{signals, ExportArgs, Kind, Session};
use crate::values;
use anyhow::{bail, Context, Result};
use qed_control::{JobTarget, StreamRequest};
use qed_nbd::{Config, Export, Listener, Server, Tls, TlsCredentials, TlsMode};
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Serve an image over NBD, or as a vhost-user-blk device.
#[derive(clap::Args)]
pub struct Args {
    /// Export to a virtual machine as a vhost-user-blk device on this Unix socket,
    /// instead of over NBD (QEMU: -chardev socket,path=SOCKET -device
    /// vhost-user-blk-pci, with guest memory shared: memory-backend-memfd,share=on).
    /// The server waits for the next frontend when one leaves, so a QEMU with
    /// reconnect-ms set comes back to it.
    #[arg(long = "vhost-user-blk", value_name = "SOCKET",
          conflicts_with_all = ["socket", "bind", "port", "name", "description", "shared", "tls", "tls_certificates", "tls_psk"])]
    vhost_user_blk: Option<PathBuf>,
    /// With --vhost-user-blk: virtqueues the guest may use (QEMU's num-queues; one per
    /// vCPU is QEMU's default).
    #[arg(long = "num-queues", default_value_t = 1, requires = "vhost_user_blk",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,
    /// With --vhost-user-blk: the logical block size the guest sees (512 or 4096).
    #[arg(long = "logical-block-size", default_value = "512", requires = "vhost_user_blk",
          value_parser = clap::builder::TypedValueParser::map(clap::builder::PossibleValuesParser::new(["512", "4096"]),
              |s: String| s.parse::<u32>().unwrap_or(512)))]
    logical_block_size: u32,
    /// With --vhost-user-blk: the serial number the guest reads (up to 20 bytes).
    #[arg(long = "serial", default_value = "", requires = "vhost_user_blk")]
    serial: String,
    /// Listen on this Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket", conflicts_with_all = ["bind", "port"])]
    socket: Option<PathBuf>,
    /// Address to bind for TCP [default: 127.0.0.1].
    #[arg(short = 'b', long = "bind")]
    bind: Option<String>,
    /// TCP port [default: 10809].
    #[arg(short = 'p', long = "port")]
    port: Option<u16>,
    /// Run in the background: return once the server accepts connections (exit 0), or
    /// with the error that kept it from starting.
    #[arg(long = "fork")]
    fork: bool,
    /// Export name.
    #[arg(short = 'x', long = "export-name", default_value = "")]
    name: String,
    /// Export description.
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// Clients served at once.
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Worker threads executing requests.
    #[arg(long = "workers", default_value_t = 32)]
    workers: usize,
    /// Start a stream job at launch: copy what the image reads from its backing chain
    /// into it while it is served, then drop the backing file (see qed stream).
    #[arg(long = "stream")]
    stream: bool,
    /// With --stream: keep this backing file (one of the chain's).
    #[arg(long = "stream-base", requires = "stream")]
    stream_base: Option<String>,
    /// With --stream: copy at most this many bytes per second (k, M, G suffixes).
    #[arg(long = "stream-rate", requires = "stream", value_parser = values::rate)]
    stream_rate: Option<u64>,
    /// TLS: off, on (for clients that ask) or require (the default when credentials
    /// are given).
    #[arg(long = "tls", value_parser = values::tls_mode)]
    tls: Option<TlsMode>,
    /// TLS with the X.509 certificates in this directory, laid out as QEMU's:
    /// ca-cert.pem, server-cert.pem, server-key.pem.
    #[arg(long = "tls-certificates", conflicts_with = "tls_psk")]
    tls_certificates: Option<PathBuf>,
    /// With --tls-certificates: clients must present a certificate signed by
    /// ca-cert.pem.
    #[arg(long = "tls-verify-peer", requires = "tls_certificates")]
    tls_verify_peer: bool,
    /// TLS with the pre-shared keys in this file: username:hexkey lines.
    #[arg(long = "tls-psk")]
    tls_psk: Option<PathBuf>,
    #[command(flatten)]
    export: ExportArgs,
}

/// Runs `qed serve`: serves until SIGINT or SIGTERM (or, unless persistent, until the
/// last client leaves), then cancels the jobs still running and leaves the image clean.
pub fn run(a: Args) -> Result<u8> {
    if let Some(socket) = a.vhost_user_blk.clone() {
        return run_vhost(&a, &socket);
    }
    // Both before any thread starts: activation changes the environment, and a fork
    // copies only the calling thread.
    let activated = super::daemon::activated_socket()?;
    if activated.is_some() && (a.socket.is_some() || a.bind.is_some() || a.port.is_some()) {
        bail!("-k, -b and -p cannot be used with socket activation (LISTEN_FDS): the socket is handed over");
    }
    let mut readiness = if a.fork {
        Some(super::daemon::fork()?)
    } else {
        None
    };
    if a.shared == 0 {
        bail!("-e/--shared must be at least 1");
    }
    let tls = load_tls(&a)?;
    let mut session = Session::open(&a.export, Kind::Serve)?;
    let stream = launch_stream(&a, session.target())?;
    // The control socket first: refused (in use by a live server), it leaves nothing
    // behind, and it is removed again if the NBD socket is refused.
    session.start_control(a.export.control.as_deref())?;
    let (listener, place) = match activated {
        Some(l) => {
            let place = super::daemon::describe(&l);
            (l, place)
        }
        None => listen(&a)?,
    };
    if let Some(path) = &a.socket {
        session.remove_at_close(path);
    }
    let tls_mode = tls.as_ref().map(|t| t.mode());
    let server = build_server(&a, session.device().clone(), tls);
    let stop = server.shutdown_flag();
    // A signal stops the jobs before the server: a cancelled stream leaves the image
    // naming its old backing file, consistent, while requests in flight finish.
    let jobs = session.jobs().clone();
    session.on_signal(signals()?, move || {
        jobs.close();
        stop.store(true, Ordering::Release);
    })?;
    session.write_pid_file(std::process::id())?;
    announce(&a, &place, tls_mode, session.control_path());
    // Started once the banner is out, so that the job's end is never logged before it.
    let started = match stream {
        Some(req) => qed_control::start_stream(session.jobs(), session.target(), req).map(|_| ()),
        None => Ok(()),
    };
    session.watch_freed(a.export.compact_free)?;
    let result = match started {
        Err(e) => Err(anyhow::anyhow!("--stream: {e}")),
        Ok(()) => {
            // The socket listens already: clients that connect now wait to be accepted.
            if let Some(r) = readiness.as_mut() {
                r.ready();
            }
            server.run(listener).context("serving")
        }
    };
    // Every request has been answered.
    drop(server);
    let flushed = session.close();
    result?;
    flushed?;
    Ok(0)
}

/// Serves the image as a vhost-user-blk device on `socket` until SIGINT or SIGTERM,
/// then leaves it clean, as the NBD export does.
fn run_vhost(a: &Args, socket: &Path) -> Result<u8> {
    if super::daemon::activated_socket()?.is_some() {
        bail!("--vhost-user-blk takes no socket handed over (LISTEN_FDS): it binds its own");
    }
    let mut readiness = if a.fork {
        Some(super::daemon::fork()?)
    } else {
        None
    };
    let mut session = Session::open(&a.export, Kind::Serve)?;
    let stream = launch_stream(a, session.target())?;
    session.start_control(a.export.control.as_deref())?;
    replace_stale_socket(socket)?;
    let granularity = match session.target() {
        JobTarget::Image(image) => u32::try_from(image.geometry().cluster_size()).unwrap_or(0),
        JobTarget::Refused(_) => 0,
    };
    let options = qed_vhost::BlkOptions {
        num_queues: usize::from(a.num_queues),
        read_only: a.export.read_only,
        discard: a.export.discard,
        logical_block_size: a.logical_block_size,
        serial: a.serial.clone(),
        discard_granularity: granularity.max(4096),
        workers: a.workers.max(1),
        log: |line| eprintln!("qed serve: {line}"),
    };
    let server = qed_vhost::Server::bind(socket, session.device().clone(), options)
        .with_context(|| format!("could not listen on {}", socket.display()))?;
    session.remove_at_close(socket);
    let stopper = server.stopper();
    let jobs = session.jobs().clone();
    session.on_signal(signals()?, move || {
        jobs.close();
        stopper.stop();
    })?;
    session.write_pid_file(std::process::id())?;
    eprintln!(
        "qed serve: {} exported as a vhost-user-blk device ({} queue{}) on unix socket {}{}{}",
        a.export.file.display(),
        a.num_queues,
        if a.num_queues == 1 { "" } else { "s" },
        socket.display(),
        if a.export.read_only {
            " (read-only)"
        } else {
            ""
        },
        match session.control_path() {
            Some(c) => format!(", control socket {}", c.display()),
            None => String::new(),
        }
    );
    let started = match stream {
        Some(req) => qed_control::start_stream(session.jobs(), session.target(), req).map(|_| ()),
        None => Ok(()),
    };
    session.watch_freed(a.export.compact_free)?;
    let result = match started {
        Err(e) => Err(anyhow::anyhow!("--stream: {e}")),
        Ok(()) => {
            if let Some(r) = readiness.as_mut() {
                r.ready();
            }
            server.run().context("serving").map(|per_queue| {
                let counts: Vec<String> = per_queue.iter().map(u64::to_string).collect();
                eprintln!(
                    "qed serve: requests completed per queue: {}",
                    counts.join(", ")
                );
            })
        }
    };
    let flushed = session.close();
    result?;
    flushed?;
    Ok(0)
}

/// Removes a socket an earlier server left at `path` (it would make the bind fail);
/// refuses anything else there.
fn replace_stale_socket(path: &Path) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).ok();
        } else {
            bail!("{} exists and is not a socket", path.display());
        }
    }
    Ok(())
}

/// The line that says the export is served: what, where, and how.
fn announce(a: &Args, place: &str, tls: Option<TlsMode>, control: Option<&Path>) {
    let tls_note = match tls {
        Some(TlsMode::Require) => ", TLS required",
        Some(TlsMode::On) => ", TLS offered",
        _ => "",
    };
    eprintln!(
        "qed serve: {} exported as '{}' on {place}{}{tls_note}{}",
        a.export.file.display(),
        a.name,
        if a.export.read_only {
            " (read-only)"
        } else {
            ""
        },
        match control {
            Some(c) => format!(", control socket {}", c.display()),
            None => String::new(),
        }
    );
}

/// The stream `--stream` asks for, refused before anything listens when it could not
/// start.
fn launch_stream(a: &Args, target: &JobTarget) -> Result<Option<StreamRequest>> {
    if !a.stream {
        return Ok(None);
    }
    let image = match target {
        JobTarget::Image(image) => image,
        JobTarget::Refused(why) => bail!("--stream: {why}"),
    };
    if a.export.read_only {
        bail!("--stream writes into the image: it cannot be exported read-only (-r)");
    }
    if let Some(base) = &a.stream_base {
        qed::stream_base(image, base).context("--stream-base")?;
    }
    Ok(Some(StreamRequest {
        id: None,
        base: a.stream_base.clone(),
        rate: a.stream_rate,
    }))
}

/// Binds the Unix socket or TCP address asked for; returns the listener and where it
/// listens, for people.
fn listen(a: &Args) -> Result<(Listener, String)> {
    if let Some(path) = &a.socket {
        replace_stale_socket(path)?;
        let l = UnixListener::bind(path)
            .with_context(|| format!("could not listen on {}", path.display()))?;
        return Ok((Listener::Unix(l), format!("unix socket {}", path.display())));
    }
    let addr = format!(
        "{}:{}",
        a.bind.as_deref().unwrap_or("127.0.0.1"),
        a.port.unwrap_or(10809)
    );
    let l = TcpListener::bind(&addr).with_context(|| format!("could not listen on {addr}"))?;
    let local = l.local_addr().map(|a| a.to_string()).unwrap_or(addr);
    Ok((Listener::Tcp(l), local))
}

/// The TLS policy and credentials asked for, loaded and checked before anything
/// listens; `None` for TLS off. As with nbdkit, `--tls=off` ignores credentials; as
/// with qemu-nbd, credentials alone mean TLS is required.
fn load_tls(a: &Args) -> Result<Option<Arc<Tls>>> {
    let credentials = match (&a.tls_certificates, &a.tls_psk) {
        (Some(dir), _) => Some(TlsCredentials::X509 {
            dir: dir.clone(),
            verify_peer: a.tls_verify_peer,
        }),
        (None, Some(file)) => Some(TlsCredentials::Psk(file.clone())),
        (None, None) => None,
    };
    let mode = match a.tls {
        None if credentials.is_some() => TlsMode::Require,
        None => TlsMode::Off,
        Some(mode) => mode,
    };
    if mode == TlsMode::Off {
        return Ok(None);
    }
    let Some(credentials) = credentials else {
        bail!("--tls=on and --tls=require need --tls-certificates DIR or --tls-psk FILE");
    };
    let tls = Tls::new(mode, &credentials).context("TLS credentials")?;
    Ok(Some(Arc::new(tls)))
}

fn build_server(a: &Args, device: Arc<dyn qed::BlockDevice>, tls: Option<Arc<Tls>>) -> Server {
    let export = Export {
        device,
        name: a.name.clone(),
        description: a.description.clone(),
        read_only: a.export.read_only,
        discard: a.export.discard,
    };
    let config = Config {
        max_connections: a.shared,
        persistent: a.persistent,
        workers: a.workers,
        tls,
        log: |line| eprintln!("qed serve: {line}"),
        ..Config::default()
    };
    Server::new(export, config)
}
