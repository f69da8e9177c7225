//! Ranged GETs over http and https ([`RangedGet`]), for every protocol whose objects
//! are reached that way: plain URLs (`http.rs`) and S3 (`s3.rs`).
//!
//! Servers are not trusted to honour what was asked: a read is accepted only as a 206
//! whose Content-Range is exactly the range asked for, with exactly that many bytes. The
//! object is pinned when opened (by ETag, else Last-Modified) and every read is made
//! conditional on it, so that a base replaced under its overlays is noticed instead of
//! mixed with the old one. Transient failures are retried with backoff, within a deadline,
//! waiting at least as long as a 429's or 503's Retry-After asks.
//!
//! What differs between protocols is only how a request is addressed and how a refusal
//! reads: that is a [`Target`], and the rest ([`RangedGet`]) is one implementation.

use super::options::{RemoteOptions, RemoteReport};
use super::{RangeSource, RemoteIdentity};
use std::fmt::Debug;
use std::io::{self, Read};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How one protocol addresses the GETs of an object, and reads the server's refusals.
pub(crate) trait Target: Send + Sync + Debug {
    /// The object's name as the user gave it, for messages; never a signed URL.
    fn name(&self) -> &str;

    /// The URL of the next request. Called for every attempt, so that a signature made
    /// here is always fresh, however long the retries took.
    fn url(&self) -> Result<String, String>;

    /// Where the object is, unsigned and with the server in it: with the version, what
    /// names its bytes in the host cache. The name given, by default.
    fn address(&self) -> String {
        self.name().to_string()
    }

    /// Where requests go when that is not plain from [`Target::name`] (an S3 endpoint),
    /// for messages about failures to reach it; never a signed URL.
    fn endpoint(&self) -> Option<String> {
        None
    }

    /// What a reply with `status` means, given the start of its body (at most
    /// [`ERROR_BODY_LIMIT`] bytes). Not asked about 2xx, 412 (the pinned version is
    /// gone), 429 and 5xx (retried), which mean the same on every protocol; a
    /// [`Failure::transient`] answer is retried.
    fn refusal(&self, status: u16, body: &[u8]) -> Failure;
}

/// The most of an error reply's body that is read, to explain it.
pub(crate) const ERROR_BODY_LIMIT: u64 = 16 << 10;

/// One failed attempt: why, and whether another might succeed.
#[derive(Debug)]
pub(crate) struct Failure {
    reason: String,
    retry: bool,
    /// How long the server asked to be left alone (a 429's or 503's Retry-After).
    retry_after: Option<Duration>,
}

impl Failure {
    /// A failure that another attempt would repeat.
    pub(crate) fn fatal(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            retry: false,
            retry_after: None,
        }
    }

    /// Why.
    pub(crate) fn reason(&self) -> &str {
        &self.reason
    }

    /// A failure that another attempt may not repeat.
    pub(crate) fn transient(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            retry: true,
            retry_after: None,
        }
    }
}

/// Reads a Retry-After value: delay-seconds or an HTTP-date, as the time to wait from
/// now (zero for a date already past). Anything else (garbage, a negative number) is
/// `None`, and the usual backoff applies.
fn parse_retry_after(value: &str) -> Option<Duration> {
    // Longer than any deadline worth having; it also keeps the arithmetic small.
    const CAP: u64 = 1 << 32;
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        let secs = value.parse::<u64>().unwrap_or(CAP).min(CAP);
        return Some(Duration::from_secs(secs));
    }
    let when = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(value)
        .ok()?;
    let ahead = when
        .as_second()
        .saturating_sub(jiff::Timestamp::now().as_second());
    Some(Duration::from_secs(ahead.clamp(0, CAP as i64) as u64))
}

/// What the object was when opened, checked on every read.
#[derive(Debug, Clone)]
enum Validator {
    /// A strong ETag: sent as If-Match.
    ETag(String),
    /// Last-Modified: sent as If-Unmodified-Since.
    LastModified(String),
    /// The server gave neither; only the size is checked.
    None,
}

/// An object read by exact ranged GETs, addressed by a [`Target`].
#[derive(Debug)]
pub(crate) struct RangedGet<T> {
    pub(crate) target: T,
    agent: ureq::Agent,
    size: u64,
    validator: Validator,
    /// Any ETag seen at open, weak ones included, to notice a changed object even where
    /// the precondition cannot be sent.
    etag: Option<String>,
    /// The Last-Modified seen at open.
    last_modified: Option<String>,
    retry: Retrier,
}

/// Retries of one server's requests, within a deadline, waiting at least as long as a
/// 429's or 503's Retry-After asks: every request to the server (reads, and the parts
/// of an upload) goes through one, so that they share what they learn of an outage.
#[derive(Debug)]
pub(crate) struct Retrier {
    request_timeout: Duration,
    deadline: Duration,
    report: RemoteReport,
    /// When the server stopped answering (the start of the first attempt that failed
    /// since the last one that worked), shared by every request: each one's deadline
    /// counts from it, so that requests starting during an outage do not each wait a
    /// whole deadline of their own.
    outage: Mutex<Option<Instant>>,
}

/// An HTTP client for one server, as `opts` says.
pub(crate) fn agent(opts: &RemoteOptions) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(opts.connect_timeout))
        .timeout_global(Some(opts.request_timeout))
        // Idle connections kept for many concurrent readers (an NBD export's
        // workers), not only one read's `connections`: a reader that found none
        // would pay a new connection (and a resolver thread) per request.
        .max_idle_connections(IDLE_CONNECTIONS)
        .max_idle_connections_per_host(IDLE_CONNECTIONS)
        .max_response_header_size(64 << 10)
        .user_agent(concat!("qed/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

impl Retrier {
    /// Retries as `opts` says.
    pub(crate) fn new(opts: &RemoteOptions) -> Self {
        Self {
            request_timeout: opts.request_timeout,
            deadline: opts.deadline,
            report: opts.report.clone(),
            outage: Mutex::new(None),
        }
    }

    fn outage(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.outage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `attempt` until it succeeds, fails for good, or the deadline passes; each
    /// attempt gets the request timeout or what is left of the deadline, if less.
    pub(crate) fn run<R>(
        &self,
        name: &str,
        mut attempt: impl FnMut(Duration) -> Result<R, Failure>,
    ) -> Result<R, String> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut attempts = 0u32;
        loop {
            let deadline = self.outage_start(started) + self.deadline;
            let tried = Instant::now();
            // Even past the deadline a read makes one attempt (the server may be back),
            // and the last retry is given a little time.
            let floor = if attempts == 0 { MIN_ATTEMPT } else { LAST_TRY };
            let left = deadline.saturating_duration_since(tried).max(floor);
            attempts += 1;
            let failure = match attempt(self.request_timeout.min(left)) {
                Ok(v) => {
                    self.answered(name);
                    return Ok(v);
                }
                Err(f) => f,
            };
            let gave_up = |why: &str| {
                format!(
                    "{} ({why} after {attempts} attempt{} in {:.1}s)",
                    failure.reason,
                    if attempts == 1 { "" } else { "s" },
                    started.elapsed().as_secs_f64()
                )
            };
            if !failure.retry {
                return Err(if attempts == 1 {
                    failure.reason
                } else {
                    gave_up("failed")
                });
            }
            self.not_answering(name, tried, &failure);
            let left = deadline.saturating_duration_since(Instant::now());
            if left <= LAST_TRY {
                return Err(gave_up(&format!(
                    "gave up at the {}s deadline",
                    self.deadline.as_secs_f64()
                )));
            }
            std::thread::sleep(pause(delay, left, failure.retry_after));
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Where the deadline of a read that `started` then counts from: when the server
    /// stopped answering, if that was before this read. An outage older than two
    /// deadlines is over for a new read: every read caught in it has given up, and a
    /// server that came back slow (nothing succeeded to end the outage) must not leave
    /// each later read a single try.
    fn outage_start(&self, started: Instant) -> Instant {
        let mut outage = self.outage();
        match *outage {
            Some(t) if started.saturating_duration_since(t) >= 2 * self.deadline => {
                *outage = None;
                started
            }
            Some(t) => t.min(started),
            None => started,
        }
    }

    /// An attempt worked: ends the outage, if there was one, and says so.
    fn answered(&self, name: &str) {
        // Taken first: the report is made without holding the lock.
        let ended = self.outage().take();
        if let Some(t) = ended {
            self.report.say(&format!(
                "{}: the server answers again, after {:.1} s",
                name,
                t.elapsed().as_secs_f64()
            ));
        }
    }

    /// An attempt made at `tried` failed and will be retried: starts the outage, once,
    /// and says so.
    fn not_answering(&self, name: &str, tried: Instant, failure: &Failure) {
        let mut outage = self.outage();
        if outage.is_none() {
            *outage = Some(tried);
            drop(outage);
            self.report.say(&format!(
                "{}: {}; retrying until {} s have passed without an answer",
                name,
                failure.reason,
                self.deadline.as_secs_f64()
            ));
        }
    }
}

/// A response header, when present and text.
pub(crate) fn header<'a>(
    resp: &'a ureq::http::Response<ureq::Body>,
    name: &str,
) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`).
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.trim().split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.parse().ok()?, end.parse().ok()?, total))
}

/// How a failed exchange with the server reads in a message.
fn describe_error(e: &ureq::Error) -> (String, bool) {
    use ureq::Error as E;
    match e {
        E::Timeout(t) => (format!("timed out ({t})"), true),
        E::Io(io) => (format!("{io}"), true),
        E::ConnectionFailed => ("connection failed".into(), true),
        E::HostNotFound => ("host not found".into(), false),
        // The URL may be a signed one: its text is not repeated.
        E::BadUri(_) => ("the request URL is not valid".into(), false),
        other => (other.to_string(), false),
    }
}

/// A request that got no reply: retried when another attempt may get one.
pub(crate) fn unreached(e: &ureq::Error, endpoint: Option<String>) -> Failure {
    let (mut reason, retry) = describe_error(e);
    // Not reaching the server: say which server, where the name does not.
    if let Some(endpoint) = endpoint {
        reason = format!("{reason} (endpoint {endpoint})");
    }
    Failure {
        reason,
        retry,
        retry_after: None,
    }
}

/// The shortest attempt a read makes, even when its deadline has passed.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);
/// The time left for the last attempt before the deadline.
const LAST_TRY: Duration = Duration::from_millis(200);

/// Connections the pool keeps open between requests.
const IDLE_CONNECTIONS: usize = 64;

impl<T: Target> RangedGet<T> {
    /// Opens the object: its size and validator, from a GET of its first byte.
    pub(crate) fn open(target: T, opts: &RemoteOptions) -> Result<Self, String> {
        let mut source = Self {
            target,
            agent: agent(opts),
            size: 0,
            validator: Validator::None,
            etag: None,
            last_modified: None,
            retry: Retrier::new(opts),
        };
        let (size, validator, etag, last_modified) =
            source.with_retries(|s, timeout| s.probe(timeout))?;
        source.size = size;
        source.validator = validator;
        source.etag = etag;
        source.last_modified = last_modified;
        Ok(source)
    }

    /// Runs `attempt` as [`Retrier::run`] does, naming the object in reports.
    fn with_retries<R>(
        &self,
        mut attempt: impl FnMut(&Self, Duration) -> Result<R, Failure>,
    ) -> Result<R, String> {
        self.retry
            .run(self.target.name(), |timeout| attempt(self, timeout))
    }

    /// Sends a GET of `[start, end]` (inclusive), with the pinned validator.
    fn get(
        &self,
        start: u64,
        end: u64,
        timeout: Duration,
    ) -> Result<ureq::http::Response<ureq::Body>, Failure> {
        let url = self.target.url().map_err(Failure::fatal)?;
        let mut req = self
            .agent
            .get(&url)
            .header("Range", format!("bytes={start}-{end}"));
        match &self.validator {
            Validator::ETag(tag) => req = req.header("If-Match", tag),
            Validator::LastModified(date) => req = req.header("If-Unmodified-Since", date),
            Validator::None => {}
        }
        let result = req.config().timeout_global(Some(timeout)).build().call();
        result.map_err(|e| unreached(&e, self.target.endpoint()))
    }

    /// A status the caller does not expect: retried when the server may recover.
    fn unexpected_status(&self, resp: ureq::http::Response<ureq::Body>) -> Failure {
        if resp.status().as_u16() == 412 {
            let _ = error_body(resp);
            return Failure::fatal(self.changed("the server refused the pinned version (412)"));
        }
        refused(resp, |status, body| self.target.refusal(status, body))
    }

    fn changed(&self, how: &str) -> String {
        format!(
            "the base image changed since it was opened ({how}); images that use it as \
             their base no longer read what they were written against: restore it or \
             rebase them"
        )
    }

    /// Finds the size, validator, ETag and Last-Modified with a GET of the first byte.
    #[allow(clippy::type_complexity)]
    fn probe(
        &self,
        timeout: Duration,
    ) -> Result<(u64, Validator, Option<String>, Option<String>), Failure> {
        let resp = self.get(0, 0, timeout)?;
        let status = resp.status().as_u16();
        let content_range = header(&resp, "content-range").map(str::to_string);
        let size = match status {
            206 => {
                let Some((0, 0, Some(total))) =
                    content_range.as_deref().and_then(parse_content_range)
                else {
                    return Err(Failure::fatal(format!(
                        "does not support byte ranges (a 206 without a valid Content-Range: {})",
                        content_range.as_deref().unwrap_or("none")
                    )));
                };
                total
            }
            // An empty object has no byte 0 to give.
            416 if content_range.as_deref().map(str::trim) == Some("bytes */0") => 0,
            200 => {
                return Err(Failure::fatal(
                    "does not support byte ranges (it answered a range request with 200 and \
                     the whole object)",
                ))
            }
            _ => return Err(self.unexpected_status(resp)),
        };
        let etag = header(&resp, "etag").map(str::to_string);
        let last_modified = header(&resp, "last-modified").map(str::to_string);
        let validator = match (&etag, header(&resp, "last-modified")) {
            (Some(tag), _) if !tag.starts_with("W/") => Validator::ETag(tag.clone()),
            (_, Some(date)) => Validator::LastModified(date.to_string()),
            _ => Validator::None,
        };
        if size > 0 {
            let mut byte = [0u8; 1];
            self.read_body(resp, &mut byte)?;
        }
        Ok((size, validator, etag, last_modified))
    }

    /// One attempt at fetching `buf.len()` bytes at `offset`.
    fn fetch_once(&self, buf: &mut [u8], offset: u64, timeout: Duration) -> Result<(), Failure> {
        let end = offset + buf.len() as u64 - 1;
        let resp = self.get(offset, end, timeout)?;
        match resp.status().as_u16() {
            206 => {}
            200 => {
                return Err(Failure::fatal(
                    "the server ignored the byte range and answered 200 with the whole object",
                ))
            }
            _ => return Err(self.unexpected_status(resp)),
        }
        let content_range = header(&resp, "content-range");
        match content_range.and_then(parse_content_range) {
            Some((s, e, total)) if s == offset && e == end => {
                if let Some(t) = total.filter(|&t| t != self.size) {
                    return Err(Failure::fatal(self.changed(&format!(
                        "its size was {} bytes and is now {t}",
                        self.size
                    ))));
                }
            }
            _ => {
                return Err(Failure::fatal(format!(
                    "the server answered bytes {offset}-{end} with Content-Range {}",
                    content_range.unwrap_or("missing")
                )))
            }
        }
        if let (Some(was), Some(now)) = (&self.etag, header(&resp, "etag")) {
            if was != now {
                return Err(Failure::fatal(
                    self.changed(&format!("its ETag was {was} and is now {now}")),
                ));
            }
        }
        self.read_body(resp, buf)
    }

    /// Reads exactly `buf.len()` bytes of body, and checks that no more follow.
    fn read_body(
        &self,
        resp: ureq::http::Response<ureq::Body>,
        buf: &mut [u8],
    ) -> Result<(), Failure> {
        // One byte more than asked for at most: enough to tell a long body.
        let mut reader = resp.into_body().into_reader().take(buf.len() as u64 + 1);
        let mut got = 0;
        while got < buf.len() {
            match reader.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Failure::transient(format!(
                        "reading the body failed after {got} of {} bytes: {e}",
                        buf.len()
                    )))
                }
            }
        }
        if got < buf.len() {
            return Err(Failure::transient(format!(
                "the body was short: {got} of {} bytes",
                buf.len()
            )));
        }
        let mut extra = [0u8; 1];
        match reader.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(Failure::fatal(format!(
                "the body was longer than the {} bytes asked for",
                buf.len()
            ))),
            // The bytes asked for all came; a failure past them does not change them.
            Err(_) => Ok(()),
        }
    }
}

/// What a reply of an unexpected status means: 429 and 5xx are retried (no sooner than
/// a 429's or 503's Retry-After asks), the rest read as `refusal` says.
pub(crate) fn refused(
    resp: ureq::http::Response<ureq::Body>,
    refusal: impl FnOnce(u16, &[u8]) -> Failure,
) -> Failure {
    let status = resp.status().as_u16();
    let retry_after = header(&resp, "retry-after").and_then(parse_retry_after);
    let body = error_body(resp);
    let mut failure = match status {
        // The protocol may tell more (S3 says SlowDown), but these are retried anyway.
        429 | 500..=599 => {
            let mut f = refusal(status, &body);
            if !f.reason.contains(&status.to_string()) {
                f.reason = format!("the server answered {status}: {}", f.reason);
            }
            f.retry = true;
            f
        }
        s => refusal(s, &body),
    };
    if matches!(status, 429 | 503) {
        failure.retry_after = retry_after;
    }
    failure
}

/// The start of an error reply's body, at most [`ERROR_BODY_LIMIT`] bytes; whatever
/// could be read before a failure (the request's timeout bounds the wait).
pub(crate) fn error_body(resp: ureq::http::Response<ureq::Body>) -> Vec<u8> {
    let mut body = Vec::new();
    let mut reader = resp.into_body().into_reader().take(ERROR_BODY_LIMIT);
    let mut chunk = [0u8; 4096];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    body
}

impl<T: Target> RangeSource for RangedGet<T> {
    fn name(&self) -> &str {
        self.target.name()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn identity(&self) -> RemoteIdentity {
        RemoteIdentity {
            size: self.size,
            etag: self.etag.clone(),
            last_modified: self.last_modified.clone(),
        }
    }

    fn cache_key(&self) -> Option<String> {
        // Only a version every request is checked against: a chunk stored under it is
        // of that version, whoever fetched it.
        let version = match &self.validator {
            Validator::ETag(tag) => format!("etag {tag}"),
            Validator::LastModified(date) => format!("last-modified {date}"),
            Validator::None => return None,
        };
        Some(format!(
            "{}\n{version}\nsize {}",
            self.target.address(),
            self.size
        ))
    }

    fn fetch(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.with_retries(|s, timeout| s.fetch_once(buf, offset, timeout))
            .map_err(|reason| {
                io::Error::other(format!(
                    "{}: reading {} bytes at offset {offset}: {reason}",
                    self.target.name(),
                    buf.len()
                ))
            })
    }
}

/// The pause before the next attempt, with `left` until the deadline (more than
/// [`LAST_TRY`]) and the backoff at `delay`.
fn pause(delay: Duration, left: Duration, retry_after: Option<Duration>) -> Duration {
    // Half to all of the delay, so that many readers do not retry in step; cut short so
    // that the last attempt comes just before the deadline, not a whole backoff earlier.
    let backoff = delay.mul_f64(0.5 + 0.5 * jitter()).min(left - LAST_TRY);
    // The server knows when it will be ready: not sooner than that. A wait past the
    // deadline (or an absurd one) is not honoured, since the read would fail by then
    // anyway: the backoff goes on, and may find the server ready sooner.
    match retry_after {
        Some(wait) if wait < left => backoff.max(wait),
        _ => backoff,
    }
}

/// A number in [0, 1), different from call to call and from process to process; good
/// enough to spread retries, which is all it is for.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(parse_retry_after(" 3 "), secs(3));
        assert_eq!(parse_retry_after("0"), secs(0));
        assert_eq!(parse_retry_after("99999999999999999999999"), secs(1 << 32));
        for garbage in ["", "-5", "1.5", "soon", "3s", "Wed, 99 Foo 2015"] {
            assert_eq!(parse_retry_after(garbage), None, "{garbage:?}");
        }
        // A date in the past: no wait of its own.
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), secs(0));
        assert_eq!(
            parse_retry_after("Fri, 01 Jan 9999 00:00:00 GMT"),
            secs(1 << 32)
        );
        let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(30);
        let soon = jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&soon)
            .unwrap();
        let wait = parse_retry_after(&soon).unwrap().as_secs();
        assert!((28..=30).contains(&wait), "{soon}: {wait}");
    }
}
