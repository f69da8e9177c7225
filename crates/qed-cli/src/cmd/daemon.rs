//! Starting `qed serve` as a service: a listening socket handed over by a service
//! manager (systemd's socket activation, as qemu-nbd and nbdkit honour it, and as
//! libnbd's `[ CMD ]` form uses it), and `--fork`, which returns once the server is
//! ready.

use anyhow::{bail, Context, Result};
use qed_nbd::Listener;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

/// The first descriptor a service manager hands over (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The variables of the protocol: removed once read, so that nothing the server starts
/// takes them for its own.
const LISTEN_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// The listening socket a service manager handed to this process, if it handed one:
/// `LISTEN_PID` names this process and `LISTEN_FDS` counts the descriptors from 3.
/// Variables meant for another process (another pid) are left alone.
///
/// Must run while the process has one thread: it changes the environment.
pub(crate) fn activated_socket() -> Result<Option<Listener>> {
    let Some(pid) = std::env::var_os("LISTEN_PID") else {
        return Ok(None);
    };
    // Meant for another process (a parent that was activated and started us).
    if pid.to_str().and_then(|p| p.trim().parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(None);
    }
    let fds = std::env::var("LISTEN_FDS").unwrap_or_default();
    for v in LISTEN_VARS {
        std::env::remove_var(v);
    }
    let count: u32 = fds
        .trim()
        .parse()
        .with_context(|| format!("socket activation: invalid LISTEN_FDS '{fds}'"))?;
    match count {
        0 => Ok(None),
        1 => adopt_listener(LISTEN_FDS_START).map(Some),
        n => bail!("socket activation: {n} sockets handed over (LISTEN_FDS), qed serve takes one"),
    }
}

/// Takes `fd` as the server's listening socket, after checking it is one.
fn adopt_listener(fd: RawFd) -> Result<Listener> {
    let int_opt = |level, name| -> std::io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for the duration of the call, and `len` is
        // the size of `v`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 {
            Ok(v)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let not_a_socket = || format!("socket activation: descriptor {fd} is not a socket");
    let listening = int_opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN).with_context(not_a_socket)?;
    if listening == 0 {
        bail!("socket activation: descriptor {fd} is a socket that does not listen");
    }
    let domain = int_opt(libc::SOL_SOCKET, libc::SO_DOMAIN).with_context(not_a_socket)?;
    // The manager hands it over inheritable; nothing this server starts needs it.
    // SAFETY: fcntl on a descriptor number only reads and sets its flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
    // SAFETY: the service manager handed this descriptor to this process, to own; the
    // environment that said so is gone, so nothing else takes it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(match domain {
        libc::AF_INET | libc::AF_INET6 => Listener::Tcp(TcpListener::from(owned)),
        libc::AF_UNIX => Listener::Unix(UnixListener::from(owned)),
        d => bail!("socket activation: descriptor {fd} is a socket of family {d}, not TCP or Unix"),
    })
}

/// Where an activated listener listens, for people.
pub(crate) fn describe(l: &Listener) -> String {
    let at = match l {
        Listener::Tcp(t) => t.local_addr().map(|a| a.to_string()).ok(),
        Listener::Unix(u) => u.local_addr().ok().and_then(|a| {
            a.as_pathname()
                .map(|p| format!("unix socket {}", p.display()))
        }),
    };
    match at {
        Some(at) => format!("{at} (socket activation)"),
        None => "the socket handed over (socket activation)".into(),
    }
}

/// The child's side of `--fork`: told once the server is ready, or dropped unsaid when
/// it could not start (the process exits with its error).
pub(crate) struct Readiness(Option<File>);

impl Readiness {
    /// Tells the waiting parent that the server accepts connections: it exits 0.
    pub(crate) fn ready(&mut self) {
        if let Some(mut pipe) = self.0.take() {
            // A parent gone already has nothing to learn.
            let _ = pipe.write_all(&[READY]);
        }
    }
}

/// The byte the child sends once ready.
const READY: u8 = b'R';

/// Forks the server into the background, as qemu-nbd's `--fork` does. The parent waits
/// until the child reports it ready (then exits 0), or exits with the child's status
/// when the child ends without doing so (its error went to the shared stderr). The
/// child, which alone returns, runs in a new session with stdin and stdout on
/// /dev/null; stderr stays, for the server's notices.
///
/// A fork copies only the calling thread, and a thread holding a lock at that moment
/// would leave it held in the child: so this runs before the server starts any thread,
/// and refuses if one is running.
pub(crate) fn fork() -> Result<Readiness> {
    // Without /proc the count is unknown; the call site alone then vouches for it.
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        let threads = tasks.count();
        if threads > 1 {
            bail!("--fork: the process already runs {threads} threads; it must fork before any");
        }
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("--fork: pipe");
    }
    // SAFETY: pipe2 just made these two descriptors, owned by nothing else.
    let (read_end, write_end) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: the process has a single thread (checked above), so the child starts with
    // no lock held by a thread that does not exist in it.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("--fork");
    }
    if pid > 0 {
        drop(write_end);
        std::process::exit(wait_for_child(pid, read_end));
    }
    drop(read_end);
    detach().context("--fork: detaching the server")?;
    Ok(Readiness(Some(write_end)))
}

/// Starts a new session and puts stdin and stdout on /dev/null, so that neither the
/// terminal nor a caller reading the output holds on to the server.
fn detach() -> std::io::Result<()> {
    // SAFETY: setsid takes no pointers; it fails only for a group leader, which a
    // freshly forked child is not.
    if unsafe { libc::setsid() } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for target in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The parent's side: the exit code once the child is ready (0) or has ended.
fn wait_for_child(pid: libc::pid_t, mut pipe: File) -> i32 {
    let mut b = [0u8; 1];
    loop {
        match pipe.read(&mut b) {
            Ok(1) if b[0] == READY => return 0,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // The child ended (or closed the pipe) without being ready.
            _ => break,
        }
    }
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is valid for waitpid to write.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            eprintln!("qed serve: the server did not start");
            return 1;
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) != 0 {
        libc::WEXITSTATUS(status)
    } else {
        eprintln!("qed serve: the server ended before it was ready");
        1
    }
}
