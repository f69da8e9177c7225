//! A client of the control socket, one request at a time: what `qed job` speaks.

use crate::error::{ControlError, ErrorClass};
use crate::jobs::JobInfo;
use crate::line::{LineError, LineReader};
use crate::values::{arguments_json, Argument, Return};
use serde_json::{json, Value};
use std::fmt;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Longest line accepted from a server.
const MAX_REPLY: usize = 1 << 20;
/// How long a reply may take before the server is given up on.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request got no answer, or what the server answered instead.
#[derive(Debug)]
pub enum ClientError {
    /// Connecting, reading or writing failed.
    Io(io::Error),
    /// The server said something that is not QMP.
    Protocol(String),
    /// The server answered with an error.
    Server(ControlError),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Protocol(what) => write!(f, "the server does not speak QMP: {what}"),
            ClientError::Server(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// A connection to a control socket, past the greeting and capability negotiation.
pub struct Client {
    lines: LineReader<UnixStream>,
    out: UnixStream,
    next_id: u64,
}

impl Client {
    /// Connects to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| {
            ClientError::Io(io::Error::new(
                e.kind(),
                format!("could not connect to {}: {e}", path.display()),
            ))
        })?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let out = stream.try_clone()?;
        let mut c = Client {
            lines: LineReader::new(stream, MAX_REPLY),
            out,
            next_id: 0,
        };
        let greeting = c.read()?;
        if greeting.get("QMP").is_none() {
            return Err(ClientError::Protocol(format!("greeting {greeting}")));
        }
        c.execute("qmp_capabilities", &[])?;
        Ok(c)
    }

    /// Runs `command` with `arguments`; its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: &[(&str, Argument)],
    ) -> Result<Return, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"execute": command, "arguments": arguments_json(arguments), "id": id});
        // A server that closed the connection may have said why first (too many
        // clients): that reply is worth more than the failed write.
        let sent = self.out.write_all(format!("{request}\n").as_bytes());
        loop {
            let mut reply = match (self.read(), sent.as_ref()) {
                (Ok(r), _) => r,
                (Err(_), Err(e)) => {
                    return Err(ClientError::Io(io::Error::new(e.kind(), e.to_string())))
                }
                (Err(e), Ok(())) => return Err(e),
            };
            // Events are not replies; an error without an id answers a request the
            // server could not read, which can only be this one.
            if reply.get("event").is_some() {
                continue;
            }
            match reply.get("id") {
                Some(v) if v.as_u64() == Some(id) => {}
                None => {}
                Some(_) => continue,
            }
            if let Some(v) = reply.get_mut("return") {
                return Ok(Return::from_json(v.take()));
            }
            if let Some(e) = reply.get("error") {
                let class = e.get("class").and_then(Value::as_str).unwrap_or("");
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("");
                return Err(ClientError::Server(ControlError {
                    class: ErrorClass::from_wire(class),
                    desc: desc.to_string(),
                }));
            }
            return Err(ClientError::Protocol(format!("reply {reply}")));
        }
    }

    /// Every job the server knows.
    pub fn query_jobs(&mut self) -> Result<Vec<JobInfo>, ClientError> {
        let v = self.execute("query-jobs", &[])?;
        v.jobs()
            .ok_or_else(|| ClientError::Protocol(format!("query-jobs returned {v}")))
    }

    fn read(&mut self) -> Result<Value, ClientError> {
        let line = match self.lines.next_line() {
            Ok(Some(l)) => l,
            Ok(None) => {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )))
            }
            Err(LineError::TooLong) => {
                return Err(ClientError::Protocol(format!(
                    "a line longer than {MAX_REPLY} bytes"
                )))
            }
            Err(LineError::Io(e)) => return Err(ClientError::Io(e)),
        };
        serde_json::from_slice(line)
            .map_err(|e| ClientError::Protocol(format!("invalid JSON ({e})")))
    }
}
