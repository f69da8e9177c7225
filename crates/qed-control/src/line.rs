//! Reading newline-terminated lines with a bound on their length, so that a peer that
//! never sends a newline costs at most the bound.

use std::io::{self, BufRead, BufReader, Read};

/// Lines from a byte stream, each at most `max` bytes (without its newline).
pub(crate) struct LineReader<R> {
    inner: BufReader<R>,
    max: usize,
    line: Vec<u8>,
}

/// Why no line was read.
#[derive(Debug)]
pub(crate) enum LineError {
    /// The line went past the bound before its newline.
    TooLong,
    /// Reading failed.
    Io(io::Error),
}

impl<R: Read> LineReader<R> {
    pub(crate) fn new(inner: R, max: usize) -> Self {
        Self {
            inner: BufReader::with_capacity(8192, inner),
            max,
            line: Vec::new(),
        }
    }

    /// The next line without its newline (and without a carriage return before it), or
    /// `None` at the end of the stream. A last line with no newline still counts.
    pub(crate) fn next_line(&mut self) -> Result<Option<&[u8]>, LineError> {
        self.line.clear();
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LineError::Io(e)),
            };
            if avail.is_empty() {
                if self.line.is_empty() {
                    return Ok(None);
                }
                break;
            }
            let newline = avail.iter().position(|&b| b == b'\n');
            let take = newline.unwrap_or(avail.len());
            if self.line.len() + take > self.max {
                return Err(LineError::TooLong);
            }
            self.line.extend_from_slice(&avail[..take]);
            self.inner.consume(take + usize::from(newline.is_some()));
            if newline.is_some() {
                break;
            }
        }
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        Ok(Some(&self.line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_within_and_past_the_bound() {
        let mut r = LineReader::new(&b"ab\r\n\ncdef\ngh"[..], 4);
        assert_eq!(r.next_line().unwrap(), Some(&b"ab"[..]));
        assert_eq!(r.next_line().unwrap(), Some(&b""[..]));
        assert_eq!(r.next_line().unwrap(), Some(&b"cdef"[..]));
        assert_eq!(r.next_line().unwrap(), Some(&b"gh"[..]));
        assert_eq!(r.next_line().unwrap(), None);

        let mut r = LineReader::new(&b"abcde\n"[..], 4);
        assert!(matches!(r.next_line(), Err(LineError::TooLong)));
    }

    #[test]
    fn a_long_line_is_refused_before_it_is_all_read() {
        // An endless stream without a newline: the reader stops at the bound.
        let mut r = LineReader::new(std::io::repeat(b'x'), 1 << 16);
        assert!(matches!(r.next_line(), Err(LineError::TooLong)));
        assert!(r.line.capacity() <= 1 << 17);
    }
}
