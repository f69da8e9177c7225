//! One client of the control socket: the greeting, then a reply to each line.

use crate::commands::Commands;
use crate::error::ControlError;
use crate::line::{LineError, LineReader};
use crate::protocol::{greeting, parse, reply};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;

/// Longest request line accepted, without its newline.
pub const MAX_LINE: usize = 64 << 10;

/// Serves one connection until the client leaves, a write fails, or a line is too long
/// (which ends the connection: where the next request starts is unknown).
pub(crate) fn serve(stream: UnixStream, commands: &Commands) -> io::Result<()> {
    let mut out = stream.try_clone()?;
    send(&mut out, &greeting().to_string())?;
    let mut lines = LineReader::new(stream, MAX_LINE);
    loop {
        let line = match lines.next_line() {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(LineError::TooLong) => {
                let e = ControlError::generic(format!(
                    "the request is longer than {MAX_LINE} bytes: closing the connection"
                ));
                return send(&mut out, &reply(Err(e), None));
            }
            Err(LineError::Io(e)) => return Err(e),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let answer = match parse(line) {
            Ok(req) => reply(commands.execute(&req.execute, req.arguments), req.id),
            Err((id, e)) => reply(Err(e), id),
        };
        send(&mut out, &answer)?;
    }
}

fn send(out: &mut UnixStream, line: &str) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    out.write_all(&bytes)
}
