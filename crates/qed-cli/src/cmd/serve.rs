//! `qed serve`: export an image over NBD, in the manner of qemu-nbd.

use anyhow::{bail, Context, Result};
use qed_control::{ControlServer, JobTarget, Jobs, StreamRequest};
use qed_nbd::{Config, DiscardMode, Export, Listener, Server, Tls, TlsCredentials, TlsMode};
use signal_hook::consts::{SIGINT, SIGTERM};
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Serve an image over NBD.
#[derive(clap::Args)]
pub struct Args {
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
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Clients served at once.
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Image format: qed or raw (probed when omitted).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Host cache mode: writeback (page cache) or none (O_DIRECT).
    #[arg(long = "cache", default_value = "writeback")]
    cache: String,
    /// Reads of clusters the image does not hold copy them in from its backing chain.
    #[arg(long = "copy-on-read")]
    copy_on_read: bool,
    /// Trim requests: ignore, or unmap (discard in the image).
    #[arg(long = "discard", default_value = "ignore")]
    discard: String,
    /// Write the server's process id to this file once it listens.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Worker threads executing requests.
    #[arg(long = "workers", default_value_t = 32)]
    workers: usize,
    /// Bound on cached L2 table entries, in bytes (k, M suffixes).
    #[arg(long = "l2-cache-size", default_value = "16M")]
    l2_cache: String,
    /// Listen for control commands on this Unix socket: QMP-shaped JSON lines that
    /// start, query and cancel jobs (stream, compact, defrag, query-jobs, job-cancel;
    /// see qed job).
    #[arg(long = "control")]
    control: Option<PathBuf>,
    /// Compact the image on its own (a job, as the control socket's compact) whenever
    /// the space freed by discards reaches this share of the file, in percent.
    #[arg(long = "compact-free", value_parser = clap::value_parser!(u8).range(1..=100))]
    compact_free: Option<u8>,
    /// Start a stream job at launch: copy what the image reads from its backing chain
    /// into it while it is served, then drop the backing file (see qed stream).
    #[arg(long = "stream")]
    stream: bool,
    /// With --stream: keep this backing file (one of the chain's).
    #[arg(long = "stream-base", requires = "stream")]
    stream_base: Option<String>,
    /// With --stream: copy at most this many bytes per second (k, M, G suffixes).
    #[arg(long = "stream-rate", requires = "stream")]
    stream_rate: Option<String>,
    /// TLS: off, on (for clients that ask) or require (the default when credentials
    /// are given).
    #[arg(long = "tls")]
    tls: Option<String>,
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
    /// The image.
    file: PathBuf,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// Runs `qed serve`: serves until SIGINT or SIGTERM (or, unless persistent, until the
/// last client leaves), then cancels the jobs still running and leaves the image clean.
pub fn run(a: Args) -> Result<u8> {
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
    let discard = parse_discard(&a.discard)?;
    let direct = super::parse_cache(&a.cache)?;
    if a.shared == 0 {
        bail!("-e/--shared must be at least 1");
    }
    let l2_cache_bytes = usize::try_from(crate::units::parse_size(&a.l2_cache)?)
        .context("--l2-cache-size is too large")?;
    let format = super::parse_format(a.format.as_deref())?;
    let tls = load_tls(&a)?;
    let opened = super::open_for_jobs(
        &a.file,
        format,
        &qed::OpenOptions {
            image: qed::ImageOptions {
                read_only: a.read_only,
                l2_cache_bytes,
                copy_on_read: a.copy_on_read,
                ..a.remote.read_write().image
            },
            direct,
            ..a.remote.read_write()
        },
    )?;
    let (device, target) = super::job_target(opened, &a.file);
    let stream = launch_stream(&a, &target)?.map(|req| (req, target.clone()));
    if a.compact_free.is_some() {
        if a.read_only {
            bail!(
                "--compact-free moves clusters in the image: it cannot be exported read-only (-r)"
            );
        }
        target
            .writable_image("--compact-free moves clusters in it")
            .map_err(|e| anyhow::anyhow!("--compact-free: {e}"))?;
    }

    let jobs = Jobs::new();
    let name = a.file.display().to_string();
    jobs.set_observer(move |j| eprintln!("qed serve: {name}: {}", super::job::outcome(j)));
    // The control socket first: refused (in use by a live server), it leaves nothing
    // behind, and it is removed again if the NBD socket is refused.
    let control = match &a.control {
        Some(path) => {
            let commands = super::control_commands(&jobs, &target);
            Some(ControlServer::start(path, Arc::new(commands))?)
        }
        None => None,
    };
    let (listener, place) = match activated {
        Some(l) => {
            let place = super::daemon::describe(&l);
            (l, place)
        }
        None => listen(&a)?,
    };
    let tls_note = match tls.as_ref().map(|t| t.mode()) {
        Some(TlsMode::Require) => ", TLS required",
        Some(TlsMode::On) => ", TLS offered",
        _ => "",
    };
    let server = build_server(&a, device.clone(), discard, tls);
    let stop = server.shutdown_flag();
    // A signal stops the jobs before the server: a cancelled stream leaves the image
    // naming its old backing file, consistent, while requests in flight finish.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let signal_handle = signals.handle();
    let signal_jobs = jobs.clone();
    let signal_thread = std::thread::spawn(move || {
        for _ in signals.forever() {
            signal_jobs.close();
            stop.store(true, Ordering::Release);
        }
    });
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("could not write {}", p.display()))?;
    }
    eprintln!(
        "qed serve: {} exported as '{}' on {place}{}{tls_note}{}",
        a.file.display(),
        a.name,
        if a.read_only { " (read-only)" } else { "" },
        match &control {
            Some(c) => format!(", control socket {}", c.path().display()),
            None => String::new(),
        }
    );
    // Started once the banner is out, so that the job's end is never logged before it.
    let started = match stream {
        Some((req, target)) => qed_control::start_stream(&jobs, &target, req).map(|_| ()),
        None => Ok(()),
    };
    let watcher = match a.compact_free {
        Some(percent) => Some(
            qed_control::compact_when_freed(jobs.clone(), target.clone(), percent)
                .map_err(|e| anyhow::anyhow!("--compact-free: {e}"))?,
        ),
        None => None,
    };
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
    jobs.close();
    if let Some(w) = watcher {
        let _ = w.join();
    }
    jobs.wait();
    if let Some(c) = control {
        c.stop();
    }
    signal_handle.close();
    let _ = signal_thread.join();
    // Every request has been answered: make the image clean (flush, NEED_CHECK off).
    let flushed = device.flush();
    drop(server);
    drop(device);
    remove_files(&a);
    result?;
    flushed?;
    Ok(0)
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
    if a.read_only {
        bail!("--stream writes into the image: it cannot be exported read-only (-r)");
    }
    let rate = a
        .stream_rate
        .as_deref()
        .map(crate::units::parse_size)
        .transpose()
        .context("--stream-rate")?;
    if rate == Some(0) {
        bail!("--stream-rate must be more than 0 bytes per second");
    }
    if let Some(base) = &a.stream_base {
        qed::stream_base(image, base).context("--stream-base")?;
    }
    Ok(Some(StreamRequest {
        id: None,
        base: a.stream_base.clone(),
        rate,
    }))
}

fn parse_discard(discard: &str) -> Result<DiscardMode> {
    Ok(match discard {
        "ignore" | "off" => DiscardMode::Ignore,
        "unmap" | "on" => DiscardMode::Unmap,
        d => bail!("invalid --discard '{d}': use ignore or unmap"),
    })
}

/// Binds the Unix socket or TCP address asked for; returns the listener and where it
/// listens, for people.
fn listen(a: &Args) -> Result<(Listener, String)> {
    if let Some(path) = &a.socket {
        // A socket left by an earlier server that died would make the bind fail.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(path).ok();
            } else {
                bail!("{} exists and is not a socket", path.display());
            }
        }
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
    let mode = match a.tls.as_deref() {
        None if credentials.is_some() => TlsMode::Require,
        None | Some("off") => TlsMode::Off,
        Some("on") => TlsMode::On,
        Some("require") => TlsMode::Require,
        Some(t) => bail!("invalid --tls '{t}': use off, on or require"),
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

fn build_server(
    a: &Args,
    device: Arc<dyn qed::BlockDevice>,
    discard: DiscardMode,
    tls: Option<Arc<Tls>>,
) -> Server {
    let export = Export {
        device,
        name: a.name.clone(),
        description: a.description.clone(),
        read_only: a.read_only,
        discard,
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

/// Removes the socket and pid file the server made; errors do not matter any more.
fn remove_files(a: &Args) {
    if let Some(path) = &a.socket {
        std::fs::remove_file(path).ok();
    }
    if let Some(p) = &a.pid_file {
        std::fs::remove_file(p).ok();
    }
}
