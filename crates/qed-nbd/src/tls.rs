//! TLS, as qemu-nbd and nbdkit offer it: a policy (off, on, require), and credentials,
//! X.509 certificates in QEMU's directory layout or pre-shared keys in the
//! `username:hexkey` files of qemu's tls-creds-psk and nbdkit's --tls-psk.

use openssl::error::ErrorStack;
use openssl::ssl::{
    HandshakeError, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions,
    SslStream, SslVerifyMode, SslVersion,
};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::stream::Stream;
use crate::transport::Wire;

/// Whether clients may, must or cannot use TLS (nbdkit's `--tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: NBD_OPT_STARTTLS is refused.
    Off,
    /// TLS for clients that ask for it; plain text for the others.
    On,
    /// TLS or nothing: every option but NBD_OPT_STARTTLS and NBD_OPT_ABORT is refused
    /// with NBD_REP_ERR_TLS_REQD until the connection is encrypted.
    Require,
}

/// Where the server's TLS identity comes from.
#[derive(Debug, Clone)]
pub enum TlsCredentials {
    /// A directory laid out as QEMU's tls-creds-x509 wants it: `server-cert.pem`,
    /// `server-key.pem`, and `ca-cert.pem` (read only when `verify_peer` is set).
    X509 {
        /// The directory.
        dir: PathBuf,
        /// Clients must present a certificate signed by `ca-cert.pem`.
        verify_peer: bool,
    },
    /// A file of `username:hexkey` lines.
    Psk(PathBuf),
}

/// A TLS policy with the credentials to carry it out, ready to serve connections.
pub struct Tls {
    mode: TlsMode,
    context: SslContext,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).finish()
    }
}

/// Longest pre-shared key accepted, in bytes (OpenSSL's PSK_MAX_PSK_LEN).
const MAX_PSK_LEN: usize = 512;

impl Tls {
    /// Loads the credentials and checks them (a key that does not match its
    /// certificate, an empty or malformed key file), so that a server never listens
    /// with credentials no client could use.
    pub fn new(mode: TlsMode, credentials: &TlsCredentials) -> io::Result<Tls> {
        let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(ssl_error)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(ssl_error)?;
        // No client resumes an NBD session: tickets would only cost a round of writes.
        b.set_num_tickets(0).map_err(ssl_error)?;
        b.set_options(SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET);
        // Requests come as many small records (a header, then its payload): reading
        // ahead takes whatever the socket holds in one call, not two per record.
        b.set_read_ahead(true);
        match credentials {
            TlsCredentials::X509 { dir, verify_peer } => {
                x509(&mut b, dir, *verify_peer)?;
            }
            TlsCredentials::Psk(file) => {
                let keys = read_psk_file(file)?;
                // TLS 1.2's PSK suites for older GnuTLS clients; TLS 1.3 takes the key
                // through the same callback.
                b.set_cipher_list("ECDHEPSK:DHEPSK:PSK:!aNULL:!eNULL:!3DES:!MD5:!RC4")
                    .map_err(ssl_error)?;
                b.set_psk_server_callback(move |_, identity, out| {
                    // An unknown user gets no key, and the handshake fails.
                    let key = identity.and_then(|id| keys.get(id));
                    match key {
                        Some(k) if k.len() <= out.len() => {
                            out[..k.len()].copy_from_slice(k);
                            Ok(k.len())
                        }
                        _ => Ok(0),
                    }
                });
            }
        }
        Ok(Tls {
            mode,
            context: b.build(),
        })
    }

    /// The policy.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Runs the server's side of the TLS handshake on `stream`, within the read timeout
    /// the stream has.
    pub(crate) fn accept(&self, stream: Stream) -> io::Result<SslStream<Wire>> {
        let ssl = Ssl::new(&self.context).map_err(ssl_error)?;
        ssl.accept(Wire::new(stream))
            .map_err(|e| io::Error::other(HandshakeFailed(handshake_error(&e))))
    }
}

/// Why a TLS handshake failed; the server logs it with the peer's address.
#[derive(Debug)]
pub(crate) struct HandshakeFailed(pub(crate) String);

impl fmt::Display for HandshakeFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS handshake failed: {}", self.0)
    }
}

impl std::error::Error for HandshakeFailed {}

/// Why a handshake failed, in a few words: OpenSSL's reasons without its source lines.
fn handshake_error(e: &HandshakeError<Wire>) -> String {
    let stack = |s: &ErrorStack| {
        let reasons: Vec<String> = s
            .errors()
            .iter()
            .map(|e| e.reason().unwrap_or("unknown error").to_string())
            .collect();
        reasons.join("; ")
    };
    match e {
        HandshakeError::SetupFailure(s) => stack(s),
        HandshakeError::WouldBlock(_) => "timed out".into(),
        HandshakeError::Failure(mid) => {
            let err = mid.error();
            if let Some(s) = err.ssl_error() {
                stack(s)
            } else if let Some(io) = err.io_error() {
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    "timed out".into()
                } else {
                    io.to_string()
                }
            } else {
                "the client closed the connection".into()
            }
        }
    }
}

fn ssl_error(e: ErrorStack) -> io::Error {
    io::Error::other(e.to_string())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Loads QEMU's layout from `dir`.
fn x509(b: &mut SslContextBuilder, dir: &Path, verify_peer: bool) -> io::Result<()> {
    let file = |name: &str| -> io::Result<PathBuf> {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(invalid(format!("{} is missing", p.display())))
        }
    };
    let cert = file("server-cert.pem")?;
    let key = file("server-key.pem")?;
    fn with_path(p: &Path) -> impl Fn(ErrorStack) -> io::Error + '_ {
        move |e| invalid(format!("{}: {e}", p.display()))
    }
    b.set_certificate_chain_file(&cert)
        .map_err(with_path(&cert))?;
    b.set_private_key_file(&key, SslFiletype::PEM)
        .map_err(with_path(&key))?;
    b.check_private_key().map_err(|e| {
        invalid(format!(
            "{} does not match {}: {e}",
            key.display(),
            cert.display()
        ))
    })?;
    if verify_peer {
        let ca = file("ca-cert.pem")?;
        b.set_ca_file(&ca).map_err(with_path(&ca))?;
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    } else {
        b.set_verify(SslVerifyMode::NONE);
    }
    Ok(())
}

/// Reads a `username:hexkey` file. Blank lines are skipped; anything else malformed is
/// refused, naming the line.
fn read_psk_file(path: &Path) -> io::Result<HashMap<Vec<u8>, Vec<u8>>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let keys = parse_psk(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    if keys.is_empty() {
        return Err(invalid(format!("{}: no keys", path.display())));
    }
    Ok(keys)
}

/// The keys of a PSK file's text, by user name.
fn parse_psk(text: &str) -> Result<HashMap<Vec<u8>, Vec<u8>>, String> {
    let mut keys = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let Some((user, hex)) = line.split_once(':') else {
            return Err(format!("line {n} is not username:hexkey"));
        };
        if user.is_empty() {
            return Err(format!("line {n} has no user name"));
        }
        let key = decode_hex(hex.trim()).ok_or_else(|| format!("line {n}: the key is not hex"))?;
        if key.is_empty() || key.len() > MAX_PSK_LEN {
            return Err(format!("line {n}: a key must be 1 to {MAX_PSK_LEN} bytes"));
        }
        keys.insert(user.as_bytes().to_vec(), key);
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| {
            let digit = |c: u8| (c as char).to_digit(16);
            Some((digit(p[0])? * 16 + digit(p[1])?) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files() {
        let keys = parse_psk("alice:0123456789abcdefABCDEF\n\nbob:00ff\r\n").unwrap();
        assert_eq!(
            keys[&b"alice"[..]],
            vec![0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xab, 0xcd, 0xef]
        );
        assert_eq!(keys[&b"bob"[..]], vec![0, 0xff]);
        assert!(parse_psk("alice").unwrap_err().contains("line 1"));
        assert!(parse_psk("ok:00\n:00").unwrap_err().contains("line 2"));
        assert!(parse_psk("alice:0g").is_err());
        assert!(parse_psk("alice:012").is_err());
        assert!(parse_psk("alice:").is_err());
        assert!(parse_psk(&format!("a:{}", "00".repeat(MAX_PSK_LEN + 1))).is_err());
    }
}
