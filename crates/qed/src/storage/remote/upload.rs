//! Writing a whole object to `s3://BUCKET/KEY` by multipart upload ([`S3Upload`]).
//!
//! The object is written as one sequential stream of bytes, cut into parts that are sent
//! by a few threads at once; memory stays at one part per thread plus the one being
//! filled. Nothing appears under the key until CompleteMultipartUpload, which replaces
//! any object already there in one step; an upload that fails or is given up is aborted,
//! so that no parts are left behind (and billed). Requests are retried as reads are
//! ([`Retrier`]), and refusals read as reads' do (`s3.rs`).
//!
//! The requests rusty-s3 has no action for without its XML parsing (creating and
//! completing an upload) are signed with its signing function, and their small replies
//! read by hand, bounded.

use super::options::RemoteOptions;
use super::ranged_get::{agent, error_body, header, refused, unreached, Failure, Retrier, Target};
use super::s3::{xml_element, S3Config, S3Object};
use crate::error::{Error, Result};
use rusty_s3::actions::{AbortMultipartUpload, S3Action, UploadPart};
use rusty_s3::Method;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Smallest part S3 takes, except the last one.
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// Largest part S3 takes.
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// Most parts one upload may have.
pub const MAX_PARTS: u64 = 10_000;
/// The part size when the object is small enough: large enough that a part's request
/// costs little beside its bytes, small enough that a few in flight use little memory.
const DEFAULT_PART_SIZE: u64 = 16 << 20;

/// How long a signature stays good: each attempt is signed as it starts.
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// The most of a successful reply's body (an upload's id, a completion) that is read.
const REPLY_LIMIT: u64 = 64 << 10;

/// The part size for an object of `size` bytes: 16 MiB, or for an object too large for
/// 10000 of those the smallest whole number of MiB that fits it in 10000 parts. `None`
/// when the object is too large for S3 (10000 parts of 5 GiB).
pub fn part_size_for(size: u64) -> Option<u64> {
    let needed = size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    let part = needed.max(DEFAULT_PART_SIZE);
    (part <= MAX_PART_SIZE).then_some(part)
}

/// A multipart upload in progress to one S3 object: bytes go in with
/// [`S3Upload::write`], in order; [`S3Upload::complete`] makes them the object, and
/// [`S3Upload::abort`] (or dropping the upload) discards them.
#[derive(Debug)]
pub struct S3Upload {
    shared: Arc<Shared>,
    part_size: usize,
    /// The part being filled.
    buf: Vec<u8>,
    /// The number of the part being filled, from 1.
    part: u64,
    /// Bytes written so far.
    written: u64,
    /// Parts to the senders; `None` once the senders are told to stop.
    parts: Option<SyncSender<(u64, Vec<u8>)>>,
    senders: Vec<JoinHandle<()>>,
    /// Completed or aborted: nothing is left to clean up.
    ended: bool,
}

/// A part the server took: its ETag, and the CRC32 it was sent with (base64, as S3 gives
/// it), which the completion lists too.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SentPart {
    etag: String,
    crc32: String,
}

/// The header that names the checksum every part carries. CRC32 lets S3 check each part
/// as it arrives (a part damaged on the way is refused, and sent again), and costs a
/// few milliseconds per GiB here; a server then keeps a checksum of checksums rather
/// than one over the whole object, which servers that compute that one in software do
/// at the end of the upload.
const CHECKSUM_ALGORITHM: (&str, &str) = ("x-amz-checksum-algorithm", "CRC32");
/// The header that carries a part's CRC32.
const CHECKSUM_HEADER: &str = "x-amz-checksum-crc32";

/// What the threads sending parts share.
#[derive(Debug)]
struct Shared {
    object: S3Object,
    agent: ureq::Agent,
    retry: Retrier,
    upload_id: String,
    /// Every part sent, by number.
    etags: Mutex<Vec<(u64, SentPart)>>,
    /// The first part that failed, and why; parts after it are not sent.
    failure: Mutex<Option<String>>,
    failed: AtomicBool,
}

impl S3Upload {
    /// Starts an upload to `url` (`s3://BUCKET/KEY`) on the service `config` names, in
    /// parts of `part_size` bytes (see [`part_size_for`]), `opts.connections` of them in
    /// flight at once. Requests are retried within `opts.deadline`.
    pub fn create(
        url: &str,
        config: &S3Config,
        opts: &RemoteOptions,
        part_size: u64,
    ) -> Result<Self> {
        let remote = |reason: String| Error::Remote {
            url: url.to_string(),
            reason,
        };
        opts.validate().map_err(remote)?;
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
            return Err(remote(format!(
                "a part of {part_size} bytes is outside what S3 takes ({MIN_PART_SIZE} to \
                 {MAX_PART_SIZE} bytes)"
            )));
        }
        let part_size = usize::try_from(part_size).map_err(|_| {
            remote(format!(
                "a part of {part_size} bytes does not fit in memory"
            ))
        })?;
        let object = writable(url, config).map_err(remote)?;
        let agent = agent(opts);
        let retry = Retrier::new(opts);
        let upload_id = retry
            .run(url, |timeout| start(&agent, &object, timeout))
            .map_err(|e| remote(format!("starting the upload: {e}")))?;
        let shared = Arc::new(Shared {
            object,
            agent,
            retry,
            upload_id,
            etags: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
        });
        // A rendezvous: a part is handed over only to a sender that is free, so memory
        // holds at most one part per sender and the one being filled.
        let (tx, rx) = sync_channel::<(u64, Vec<u8>)>(0);
        let rx = Arc::new(Mutex::new(rx));
        let mut upload = Self {
            shared,
            part_size,
            buf: Vec::with_capacity(part_size),
            part: 1,
            written: 0,
            parts: Some(tx),
            senders: Vec::new(),
            ended: false,
        };
        for _ in 0..opts.connections {
            let shared = upload.shared.clone();
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name("qed-upload".into())
                .spawn(move || send_parts(&shared, &rx));
            match spawned {
                Ok(t) => upload.senders.push(t),
                Err(e) => {
                    let e = remote(format!("starting a thread to send parts: {e}"));
                    return Err(upload.aborted(e));
                }
            }
        }
        Ok(upload)
    }

    /// Refuses, as [`S3Upload::create`] would, a URL that names no object or a
    /// configuration without credentials; sends nothing.
    pub fn check(url: &str, config: &S3Config) -> Result<()> {
        writable(url, config)
            .map(drop)
            .map_err(|reason| Error::Remote {
                url: url.to_string(),
                reason,
            })
    }

    /// The upload's id, which names it to the server (and to `aws s3api
    /// abort-multipart-upload`).
    pub fn upload_id(&self) -> &str {
        &self.shared.upload_id
    }

    /// The URL, as given.
    pub fn url(&self) -> &str {
        self.shared.object.name()
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `data` to the object. Waits while every sender is busy; fails once a
    /// part has failed.
    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            self.healthy()?;
            let n = (self.part_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            self.written += n as u64;
            if self.buf.len() == self.part_size {
                self.send_part()?;
            }
        }
        Ok(())
    }

    /// Makes what was written the object, replacing any object at the key. The upload
    /// is aborted if that fails. Returns the new object's ETag, if the server gave one.
    pub fn complete(mut self) -> Result<Option<String>> {
        let result = self.finish();
        if result.is_ok() {
            self.ended = true;
        }
        result.map_err(|e| self.aborted(e))
    }

    /// Discards the upload and every part sent. Fails, naming the upload's id, when the
    /// server could not be told.
    pub fn abort(mut self) -> Result<()> {
        self.ended = true;
        self.discard();
        self.send_abort().map_err(|reason| Error::Remote {
            url: self.url().to_string(),
            reason,
        })
    }

    /// `e`, with the upload aborted; when the abort fails too, `e` says so and names
    /// the upload, so that it can be removed by hand.
    pub fn aborted(&mut self, e: Error) -> Error {
        if self.ended {
            return e;
        }
        self.ended = true;
        self.discard();
        match self.send_abort() {
            Ok(()) => e,
            Err(why) => Error::Remote {
                url: self.url().to_string(),
                reason: format!("{}; and the upload could not be aborted: {why}", bare(&e)),
            },
        }
    }

    fn healthy(&self) -> Result<()> {
        if self.shared.failed.load(Ordering::Acquire) {
            let failure = self
                .shared
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            return Err(Error::Remote {
                url: self.url().to_string(),
                reason: failure.clone().unwrap_or_else(|| "a part failed".into()),
            });
        }
        Ok(())
    }

    /// Hands the filled part to a sender.
    fn send_part(&mut self) -> Result<()> {
        if self.part > MAX_PARTS {
            return Err(Error::Remote {
                url: self.url().to_string(),
                reason: format!(
                    "the object is larger than {MAX_PARTS} parts of {} bytes",
                    self.part_size
                ),
            });
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part_size));
        let sent = self
            .parts
            .as_ref()
            .is_some_and(|tx| tx.send((self.part, data)).is_ok());
        if !sent {
            self.healthy()?;
            return Err(Error::Remote {
                url: self.url().to_string(),
                reason: "the threads sending parts stopped".into(),
            });
        }
        self.part += 1;
        Ok(())
    }

    /// Sends the last part, waits for every part, and completes the upload.
    fn finish(&mut self) -> Result<Option<String>> {
        // The last part may be short; an empty object is one empty part.
        if !self.buf.is_empty() || self.part == 1 {
            self.send_part()?;
        }
        self.stop();
        self.healthy()?;
        let mut etags =
            std::mem::take(&mut *self.shared.etags.lock().unwrap_or_else(|p| p.into_inner()));
        etags.sort_unstable_by_key(|&(n, _)| n);
        if etags.len() as u64 != self.part - 1 {
            return Err(Error::Remote {
                url: self.url().to_string(),
                reason: format!("{} of {} parts were sent", etags.len(), self.part - 1),
            });
        }
        let body = completion(&etags);
        let s = &*self.shared;
        s.retry
            .run(s.object.name(), |timeout| complete(s, &body, timeout))
            .map_err(|reason| Error::Remote {
                url: self.url().to_string(),
                reason: format!("completing the upload: {reason}"),
            })
    }

    /// Stops the senders without sending what is left: a part being sent is not
    /// retried again, so that giving up does not wait out the deadline.
    fn discard(&mut self) {
        self.shared.failed.store(true, Ordering::Release);
        self.stop();
    }

    /// Tells the senders to stop once the parts handed over are sent, and waits for
    /// them.
    fn stop(&mut self) {
        self.parts = None;
        for t in self.senders.drain(..) {
            let _ = t.join();
        }
    }

    fn send_abort(&self) -> Result<(), String> {
        let s = &*self.shared;
        s.retry
            .run(s.object.name(), |timeout| abort(s, timeout))
            .map_err(|why| {
                format!(
                    "{why}; the upload {} may still hold parts: remove it with `aws s3api \
                     abort-multipart-upload --bucket {} --key {} --upload-id {}`",
                    s.upload_id,
                    s.object.bucket().name(),
                    s.object.key(),
                    s.upload_id
                )
            })
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        if !self.ended {
            self.discard();
            // Nowhere to report a failure from here: the caller that wanted to know
            // called abort().
            let _ = self.send_abort();
        }
    }
}

/// The object at `url`, if it can be written: named, and with credentials to sign with.
fn writable(url: &str, config: &S3Config) -> Result<S3Object, String> {
    let object = S3Object::at(url, config)?;
    if object.credentials().is_none() {
        return Err(
            "writing an object needs credentials, and none are set: set \
                    AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                .into(),
        );
    }
    Ok(object)
}

/// An error's reason without the URL it names, for joining to another about that URL.
fn bare(e: &Error) -> String {
    match e {
        Error::Remote { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// A sender: takes parts until there are no more, and sends each unless one has failed.
fn send_parts(s: &Shared, rx: &Mutex<Receiver<(u64, Vec<u8>)>>) {
    loop {
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((number, data)) = next else {
            return;
        };
        if s.failed.load(Ordering::Acquire) {
            continue;
        }
        let crc32 = crc32_base64(&data);
        let sent = s.retry.run(s.object.name(), |timeout| {
            // Checked before each attempt: a retry of an upload given up is not made.
            if s.failed.load(Ordering::Acquire) {
                return Err(Failure::fatal("the upload was given up"));
            }
            put_part(s, number, &data, &crc32, timeout)
        });
        match sent {
            Ok(etag) => s
                .etags
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((number, SentPart { etag, crc32 })),
            Err(e) => {
                let mut failure = s.failure.lock().unwrap_or_else(|p| p.into_inner());
                if failure.is_none() {
                    *failure = Some(format!("sending part {number} ({} bytes): {e}", data.len()));
                }
                s.failed.store(true, Ordering::Release);
            }
        }
    }
}

/// The CRC32 of `data`, big-endian in base64, as S3 takes and gives it.
fn crc32_base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(crc32fast::hash(data).to_be_bytes())
}

/// The object's URL with `query` and `headers`, signed for `method`; the request must
/// carry those headers as given.
fn signed(
    object: &S3Object,
    method: Method,
    query: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> Result<String, Failure> {
    let url = object
        .bucket()
        .object_url(object.key())
        .map_err(|e| Failure::fatal(format!("the key cannot be put in a URL: {e}")))?;
    let c = object
        .credentials()
        .ok_or_else(|| Failure::fatal("no credentials to sign with"))?;
    let url = rusty_s3::signing::sign(
        &jiff::Timestamp::now(),
        method,
        url,
        c.key(),
        c.secret(),
        c.token(),
        object.bucket().region(),
        SIGNATURE_LIFETIME.as_secs(),
        query.iter().copied(),
        headers.iter().copied(),
    );
    Ok(url.to_string())
}

/// Reads a successful reply's body, at most [`REPLY_LIMIT`] bytes.
fn reply_body(resp: ureq::http::Response<ureq::Body>) -> Result<String, Failure> {
    let mut body = Vec::new();
    resp.into_body()
        .into_reader()
        .take(REPLY_LIMIT)
        .read_to_end(&mut body)
        .map_err(|e| Failure::transient(format!("reading the reply failed: {e}")))?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// CreateMultipartUpload: the new upload's id.
fn start(agent: &ureq::Agent, object: &S3Object, timeout: Duration) -> Result<String, Failure> {
    let url = signed(
        object,
        Method::Post,
        &[("uploads", "")],
        &[CHECKSUM_ALGORITHM],
    )?;
    let resp = agent
        .post(&url)
        .header(CHECKSUM_ALGORITHM.0, CHECKSUM_ALGORITHM.1)
        .config()
        .timeout_global(Some(timeout))
        .build()
        .send_empty()
        .map_err(|e| unreached(&e, object.endpoint()))?;
    if resp.status().as_u16() != 200 {
        return Err(refused(resp, |st, b| object.refusal(st, b)));
    }
    let body = reply_body(resp)?;
    upload_id(&body).ok_or_else(|| {
        Failure::fatal("the server started an upload but its reply names no upload id")
    })
}

/// The `<UploadId>` of a CreateMultipartUpload reply, exactly as sent (it goes back in
/// every later request): none when absent, empty, longer than 1024 bytes, or holding
/// anything but printable ASCII without spaces or markup.
fn upload_id(body: &str) -> Option<String> {
    let start = body.find("<UploadId>")? + "<UploadId>".len();
    let len = body[start..].find("</UploadId>")?;
    let id = &body[start..start + len];
    let plain = id
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'&'));
    (!id.is_empty() && id.len() <= 1024 && plain).then(|| id.to_string())
}

/// UploadPart: the part's ETag.
fn put_part(
    s: &Shared,
    number: u64,
    data: &[u8],
    crc32: &str,
    timeout: Duration,
) -> Result<String, Failure> {
    let number16 = u16::try_from(number)
        .map_err(|_| Failure::fatal(format!("part {number} is beyond S3's {MAX_PARTS}")))?;
    let c = s.object.credentials();
    let mut action = UploadPart::new(s.object.bucket(), c, s.object.key(), number16, &s.upload_id);
    action.headers_mut().insert(CHECKSUM_HEADER, crc32);
    let url = action.sign(SIGNATURE_LIFETIME);
    let resp = s
        .agent
        .put(url.as_str())
        .header(CHECKSUM_HEADER, crc32)
        .config()
        .timeout_global(Some(timeout))
        .build()
        .send(data)
        .map_err(|e| unreached(&e, s.object.endpoint()))?;
    if resp.status().as_u16() != 200 {
        return Err(refused(resp, |st, b| s.object.refusal(st, b)));
    }
    let etag = header(&resp, "etag")
        .map(str::to_string)
        .filter(|t| !t.is_empty() && t.len() <= 1024)
        .ok_or_else(|| Failure::fatal("the server took a part but gave no ETag for it"))?;
    let _ = error_body(resp);
    Ok(etag)
}

/// The body of CompleteMultipartUpload.
fn completion(parts: &[(u64, SentPart)]) -> String {
    let mut body = String::from("<CompleteMultipartUpload>");
    for (n, part) in parts {
        let tag = part
            .etag
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        // The CRC32 is base64: nothing in it needs escaping.
        let crc = &part.crc32;
        body += &format!(
            "<Part><PartNumber>{n}</PartNumber><ETag>{tag}</ETag>\
             <ChecksumCRC32>{crc}</ChecksumCRC32></Part>"
        );
    }
    body + "</CompleteMultipartUpload>"
}

/// CompleteMultipartUpload: the object's ETag, if given.
fn complete(s: &Shared, body: &str, timeout: Duration) -> Result<Option<String>, Failure> {
    let url = signed(&s.object, Method::Post, &[("uploadId", &s.upload_id)], &[])?;
    let resp = s
        .agent
        .post(&url)
        .header("Content-Type", "application/xml")
        .config()
        .timeout_global(Some(timeout))
        .build()
        .send(body.as_bytes())
        .map_err(|e| unreached(&e, s.object.endpoint()))?;
    if resp.status().as_u16() != 200 {
        return Err(refused(resp, |st, b| s.object.refusal(st, b)));
    }
    // S3 may answer 200 and still fail, with an error in the body.
    let reply = reply_body(resp)?;
    if reply.contains("<Error>") {
        let code = xml_element(&reply, "Code").unwrap_or_default();
        let failure = s.object.refusal(500, reply.as_bytes());
        return Err(
            if matches!(code.as_str(), "InternalError" | "SlowDown" | "") {
                Failure::transient(failure.reason().to_string())
            } else {
                failure
            },
        );
    }
    Ok(xml_element(&reply, "ETag"))
}

/// AbortMultipartUpload. An upload the server no longer knows is gone already.
fn abort(s: &Shared, timeout: Duration) -> Result<(), Failure> {
    let url = AbortMultipartUpload::new(
        s.object.bucket(),
        s.object.credentials(),
        s.object.key(),
        &s.upload_id,
    )
    .sign(SIGNATURE_LIFETIME);
    let resp = s
        .agent
        .delete(url.as_str())
        .config()
        .timeout_global(Some(timeout))
        .build()
        .call()
        .map_err(|e| unreached(&e, s.object.endpoint()))?;
    match resp.status().as_u16() {
        200..=299 => Ok(()),
        404 => Ok(()),
        _ => Err(refused(resp, |st, b| s.object.refusal(st, b))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_with_the_object_and_stay_within_s3s_limits() {
        assert_eq!(part_size_for(0), Some(DEFAULT_PART_SIZE));
        assert_eq!(part_size_for(1 << 30), Some(DEFAULT_PART_SIZE));
        assert_eq!(
            part_size_for(MAX_PARTS * DEFAULT_PART_SIZE),
            Some(DEFAULT_PART_SIZE)
        );
        let big = MAX_PARTS * DEFAULT_PART_SIZE + 1;
        let p = part_size_for(big).unwrap();
        assert!(p > DEFAULT_PART_SIZE && p % (1 << 20) == 0 && big.div_ceil(p) <= MAX_PARTS);
        assert_eq!(
            part_size_for(MAX_PARTS * MAX_PART_SIZE),
            Some(MAX_PART_SIZE)
        );
        assert_eq!(part_size_for(MAX_PARTS * MAX_PART_SIZE + 1), None);
        assert_eq!(part_size_for(u64::MAX), None);
    }

    #[test]
    fn upload_ids_are_taken_as_sent_or_not_at_all() {
        let long = "A".repeat(900);
        let reply = format!(
            "<?xml version=\"1.0\"?><InitiateMultipartUploadResult><Bucket>b</Bucket>\
             <UploadId>{long}</UploadId></InitiateMultipartUploadResult>"
        );
        assert_eq!(upload_id(&reply), Some(long));
        assert_eq!(
            upload_id("<UploadId>a-b_c.d~e</UploadId>").as_deref(),
            Some("a-b_c.d~e")
        );
        for bad in [
            "",
            "<UploadId></UploadId>",
            "<UploadId>a b</UploadId>",
            "<UploadId>a&amp;b</UploadId>",
            "<UploadId>\u{e9}</UploadId>",
            "<UploadId>abc",
            "<html>502</html>",
        ] {
            assert_eq!(upload_id(bad), None, "{bad}");
        }
        assert_eq!(
            upload_id(&format!("<UploadId>{}</UploadId>", "x".repeat(1025))),
            None
        );
    }

    #[test]
    fn the_completion_lists_every_part_escaped() {
        let part = |etag: &str, data: &[u8]| SentPart {
            etag: etag.into(),
            crc32: crc32_base64(data),
        };
        let body = completion(&[(1, part("\"a\"", b"")), (2, part("<&>", b"123456789"))]);
        // CRC32 of "123456789" is 0xCBF43926, the check value of the IEEE polynomial.
        assert_eq!(
            body,
            "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"a\"</ETag>\
             <ChecksumCRC32>AAAAAA==</ChecksumCRC32></Part><Part><PartNumber>2</PartNumber>\
             <ETag>&lt;&amp;&gt;</ETag><ChecksumCRC32>y/Q5Jg==</ChecksumCRC32></Part>\
             </CompleteMultipartUpload>"
        );
    }
}
