//! Remote images over http against a server that misbehaves on purpose: every wrong
//! answer must be an error naming the URL, never data, and nothing may wait for ever.

use qed::{
    open_device, BlockDevice, CreateOptions, HttpStorage, Image, OpenOptions, RemoteOptions,
    S3Config, S3Credentials, S3Storage, Storage,
};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A request as the test server saw it.
#[derive(Debug, Clone)]
struct Request {
    /// The request target: path and query.
    target: String,
    headers: HashMap<String, String>,
    /// `Range: bytes=a-b`, inclusive.
    range: Option<(u64, u64)>,
}

/// What the server sends back.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Sleep before sending anything.
    stall_head: Duration,
    /// Sleep after the head, before the body.
    stall_body: Duration,
}

impl Reply {
    fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            stall_head: Duration::ZERO,
            stall_body: Duration::ZERO,
        }
    }
}

type Behaviour = dyn Fn(&Request, usize) -> Reply + Send + Sync;

/// A one-request-per-connection HTTP/1.1 server on a free loopback port; `behaviour`
/// gets each request and how many came before it.
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<Request>>>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Server {
    fn start(behaviour: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let behaviour: Arc<Behaviour> = Arc::new(behaviour);
        let accept = {
            let (stop, requests) = (stop.clone(), requests.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (stop, requests, behaviour) =
                                (stop.clone(), requests.clone(), behaviour.clone());
                            thread::spawn(move || serve(conn, &stop, &requests, &*behaviour));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Self {
            port,
            stop,
            requests,
            accept: Some(accept),
        }
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Sleeps `d`, or less if the server stops.
fn nap(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(10));
    }
}

fn serve(
    conn: TcpStream,
    stop: &AtomicBool,
    requests: &Mutex<Vec<Request>>,
    behaviour: &Behaviour,
) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut headers = HashMap::new();
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let target = line.split(' ').nth(1).unwrap_or("").to_string();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    });
    let req = Request {
        target,
        headers,
        range,
    };
    let n = {
        let mut all = requests.lock().unwrap();
        all.push(req.clone());
        all.len() - 1
    };
    let reply = behaviour(&req, n);
    nap(reply.stall_head, stop);
    let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", reply.status);
    let has_length = reply
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    for (k, v) in &reply.headers {
        head += &format!("{k}: {v}\r\n");
    }
    if !has_length {
        head += &format!("Content-Length: {}\r\n", reply.body.len());
    }
    head += "\r\n";
    let mut conn = conn;
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.flush();
    nap(reply.stall_body, stop);
    let _ = conn.write_all(&reply.body);
    let _ = conn.flush();
    let mut rest = Vec::new();
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = reader.read_to_end(&mut rest);
}

/// A well-behaved ranged answer from `data`, with `etag`, honouring If-Match.
fn ranged(data: &[u8], req: &Request, etag: &str) -> Reply {
    if let Some(want) = req.headers.get("if-match") {
        if want != etag {
            return Reply::status(412);
        }
    }
    let Some((a, b)) = req.range else {
        let mut r = Reply::status(200);
        r.body = data.to_vec();
        return r;
    };
    let size = data.len() as u64;
    if a >= size {
        let mut r = Reply::status(416);
        r.headers
            .push(("Content-Range".into(), format!("bytes */{size}")));
        return r;
    }
    let b = b.min(size - 1);
    let mut r = Reply::status(206);
    r.headers
        .push(("Content-Range".into(), format!("bytes {a}-{b}/{size}")));
    r.headers.push(("ETag".into(), etag.into()));
    r.body = data[a as usize..=b as usize].to_vec();
    r
}

fn pattern(len: usize) -> Arc<Vec<u8>> {
    Arc::new(
        (0..len)
            .map(|i| (i / 7 % 251) as u8 ^ (i >> 16) as u8)
            .collect(),
    )
}

/// Quick options, so that retried failures end in seconds.
fn quick() -> RemoteOptions {
    RemoteOptions {
        request_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        deadline: Duration::from_secs(2),
        ..RemoteOptions::default()
    }
}

/// A server that answers well, except as `bad` says for the reads after the first
/// request (the open's probe).
fn serve_data(
    data: Arc<Vec<u8>>,
    bad: impl Fn(&Request, usize, Reply) -> Reply + Send + Sync + 'static,
) -> Server {
    Server::start(move |req, n| {
        let good = ranged(&data, req, "\"v1\"");
        if n == 0 {
            good
        } else {
            bad(req, n, good)
        }
    })
}

fn read_error(storage: &HttpStorage, len: usize, offset: u64) -> String {
    let mut buf = vec![0u8; len];
    let e = storage.read_at(&mut buf, offset).unwrap_err().to_string();
    eprintln!("MSG {e}");
    e
}

#[test]
fn reads_exact_ranges_caches_and_refuses_writes() {
    let data = pattern(3 << 20 | 12345);
    let server = serve_data(data.clone(), |_, _, good| good);
    let url = server.url("disk.raw");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    assert_eq!(s.len().unwrap(), data.len() as u64);
    let probe = &server.requests()[0];
    assert_eq!(probe.range, Some((0, 0)));

    for (offset, len) in [
        (0u64, 4096usize),
        (262_000, 5000),
        (1 << 20, 1 << 20),
        (3 << 20, 12345),
    ] {
        let mut buf = vec![0u8; len];
        s.read_at(&mut buf, offset).unwrap();
        assert_eq!(
            &buf[..],
            &data[offset as usize..offset as usize + len],
            "at {offset}"
        );
    }
    // Every read is conditional on the version pinned at open.
    for r in &server.requests()[1..] {
        assert_eq!(
            r.headers.get("if-match").map(String::as_str),
            Some("\"v1\"")
        );
    }

    // Cached: the same bytes again cost nothing.
    let before = server.requests().len();
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 100).unwrap();
    assert_eq!(&buf[..], &data[100..4196]);
    assert_eq!(server.requests().len(), before);

    // Past the end reads as zeros, without asking.
    let mut tail = vec![0xffu8; 8192];
    let end = data.len() as u64;
    s.read_at(&mut tail, end - 100).unwrap();
    assert_eq!(&tail[..100], &data[data.len() - 100..]);
    assert!(tail[100..].iter().all(|&b| b == 0));
    let before = server.requests().len();
    s.read_at(&mut tail, end + 10).unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    assert_eq!(server.requests().len(), before);

    let e = s.write_at(b"x", 0).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ReadOnlyFilesystem);
    assert!(e.to_string().contains(&url), "{e}");
    assert_eq!(
        s.set_len(1).unwrap_err().kind(),
        std::io::ErrorKind::ReadOnlyFilesystem
    );
}

#[test]
fn adjacent_chunks_come_in_one_request_and_sequential_reads_read_ahead() {
    let data = pattern(8 << 20);
    let server = serve_data(data.clone(), |_, _, good| good);
    let opts = RemoteOptions {
        chunk_size: 256 << 10,
        readahead: 1 << 20,
        ..quick()
    };
    let s = HttpStorage::open(&server.url("d"), &opts).unwrap();
    // Four chunks, one request.
    let mut buf = vec![0u8; 1 << 20];
    s.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..], &data[..1 << 20]);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].range, Some((0, (1 << 20) - 1)));
    // It continues the last read: its own chunk comes at once, and the next 1 MiB in
    // the background.
    let mut buf = vec![0u8; 64 << 10];
    s.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(&buf[..], &data[1 << 20..(1 << 20) + (64 << 10)]);
    let ahead = (1 << 20) + (256 << 10)..(2 << 20) + (256 << 10);
    let covered = |reqs: &[Request]| -> u64 {
        reqs.iter()
            .filter_map(|r| r.range)
            .filter(|&(a, _)| ahead.contains(&a))
            .map(|(a, b)| b + 1 - a)
            .sum()
    };
    let started = Instant::now();
    while covered(&server.requests()) < 1 << 20 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no readahead: {:?}",
            server.requests()
        );
        thread::sleep(Duration::from_millis(10));
    }
    let reqs = server.requests();
    assert!(
        reqs.iter()
            .any(|r| r.range == Some((1 << 20, (1 << 20) + (256 << 10) - 1))),
        "{reqs:?}"
    );
    assert_eq!(covered(&reqs), 1 << 20, "{reqs:?}");
    // ...so reading on fetches nothing it reads (only more readahead, past it).
    let before = reqs.len();
    let mut buf = vec![0u8; 1 << 20];
    s.read_at(&mut buf, (1 << 20) + (64 << 10)).unwrap();
    assert_eq!(
        &buf[..],
        &data[(1 << 20) + (64 << 10)..(2 << 20) + (64 << 10)]
    );
    let reqs = server.requests();
    for r in &reqs[before..] {
        assert!(
            r.range.is_some_and(|(a, _)| a >= ahead.end),
            "{r:?} asks again for what was read ahead: {reqs:?}"
        );
    }
}

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == name)
        .count()
}

#[test]
fn dropping_a_storage_with_readahead_in_flight_returns_at_once() {
    let data = pattern(16 << 20);
    // Readahead past 2 MiB is answered only after two seconds.
    let server = serve_data(data.clone(), |req, _, mut good| {
        if req.range.is_some_and(|(a, _)| a >= 2 << 20) {
            good.stall_head = Duration::from_secs(2);
        }
        good
    });
    let opts = RemoteOptions {
        request_timeout: Duration::from_secs(10),
        deadline: Duration::from_secs(20),
        ..quick()
    };
    let s = HttpStorage::open(&server.url("d"), &opts).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    s.read_at(&mut buf, 0).unwrap();
    s.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(&buf[..], &data[1 << 20..2 << 20]);
    let started = Instant::now();
    while !server
        .requests()
        .iter()
        .any(|r| r.range.is_some_and(|(a, _)| a >= 2 << 20))
    {
        assert!(started.elapsed() < Duration::from_secs(10), "no readahead");
        thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    drop(s);
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "dropping took {:?}",
        started.elapsed()
    );
    // The prefetching threads end with their requests (other tests' with theirs).
    let started = Instant::now();
    while threads_named("qed-prefetch") > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "prefetching threads are left"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_large_read_is_split_into_parallel_requests() {
    let data = pattern(40 << 20);
    let server = serve_data(data.clone(), |_, _, good| good);
    let s = HttpStorage::open(&server.url("big"), &quick()).unwrap();
    let mut buf = vec![0u8; 40 << 20];
    s.read_at(&mut buf, 0).unwrap();
    assert!(buf == *data);
    let reads = server.requests().len() - 1;
    assert!(reads >= 5, "{reads} requests for 40 MiB");
}

#[test]
fn a_server_without_ranges_is_refused_at_open() {
    let data = pattern(1 << 20);
    let server = Server::start(move |_, _| {
        let mut r = Reply::status(200);
        r.body = data.to_vec();
        r
    });
    let url = server.url("whole");
    let e = HttpStorage::open(&url, &quick()).unwrap_err().to_string();
    assert!(
        e.contains(&url) && e.contains("does not support byte ranges"),
        "{e}"
    );
}

#[test]
fn a_206_without_content_range_is_refused_at_open() {
    let server = Server::start(|_, _| {
        let mut r = Reply::status(206);
        r.body = vec![0];
        r
    });
    let e = HttpStorage::open(&server.url("x"), &quick())
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not support byte ranges"), "{e}");
}

#[test]
fn the_whole_object_for_a_range_is_an_error() {
    let data = pattern(1 << 20);
    let d = data.clone();
    let server = serve_data(data, move |_, _, _| {
        let mut r = Reply::status(200);
        r.body = d.to_vec();
        r
    });
    let url = server.url("x");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    let e = read_error(&s, 4096, 8192);
    assert!(e.contains(&url) && e.contains("200"), "{e}");
}

#[test]
fn a_short_body_is_an_error() {
    let server = serve_data(pattern(1 << 20), |_, _, mut good| {
        good.body.truncate(good.body.len() / 2);
        good
    });
    let url = server.url("x");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    let started = Instant::now();
    let e = read_error(&s, 4096, 0);
    assert!(e.contains(&url) && e.contains("short"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_body_cut_off_before_its_length_is_an_error() {
    let server = serve_data(pattern(1 << 20), |_, _, mut good| {
        let len = good.body.len();
        good.headers
            .push(("Content-Length".into(), len.to_string()));
        good.body.truncate(len / 2);
        good
    });
    let url = server.url("x");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    let e = read_error(&s, 4096, 0);
    assert!(e.contains(&url), "{e}");
}

#[test]
fn a_long_body_is_an_error() {
    let server = serve_data(pattern(1 << 20), |_, _, mut good| {
        good.body.extend_from_slice(b"more");
        good
    });
    let url = server.url("x");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    let e = read_error(&s, 4096, 0);
    assert!(e.contains(&url) && e.contains("longer"), "{e}");
}

#[test]
fn a_wrong_content_range_is_an_error() {
    let server = serve_data(pattern(1 << 20), |req, _, mut good| {
        let (a, b) = req.range.unwrap();
        good.headers.retain(|(k, _)| k != "Content-Range");
        good.headers.push((
            "Content-Range".into(),
            format!("bytes {}-{}/{}", a + 1, b + 1, 1 << 20),
        ));
        good
    });
    let url = server.url("x");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    let e = read_error(&s, 4096, 0);
    assert!(e.contains(&url) && e.contains("Content-Range"), "{e}");
}

#[test]
fn transient_failures_are_retried() {
    let data = pattern(1 << 20);
    // The probe, then three 503s and a 429, then good answers.
    let server = serve_data(data.clone(), |_, n, good| {
        if n <= 3 {
            Reply::status(503)
        } else if n == 4 {
            Reply::status(429)
        } else {
            good
        }
    });
    let s = HttpStorage::open(&server.url("x"), &quick()).unwrap();
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 4096).unwrap();
    assert_eq!(&buf[..], &data[4096..8192]);
    assert_eq!(server.requests().len(), 6);
}

#[test]
fn retry_after_is_honoured_within_the_deadline() {
    let data = pattern(1 << 20);
    // The read's first attempt is told to come back in 2 s.
    let server = serve_data(data.clone(), |_, n, good| {
        if n == 1 {
            let mut r = Reply::status(503);
            r.headers.push(("Retry-After".into(), "2".into()));
            r
        } else {
            good
        }
    });
    let opts = RemoteOptions {
        deadline: Duration::from_secs(10),
        ..quick()
    };
    let s = HttpStorage::open(&server.url("x"), &opts).unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 0).unwrap();
    let took = started.elapsed();
    assert_eq!(&buf[..], &data[..4096]);
    assert_eq!(server.requests().len(), 3);
    // Without the header the backoff would have retried within 100 ms.
    assert!(took >= Duration::from_secs(2), "retried after {took:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn retry_after_as_a_date_is_honoured() {
    let data = pattern(1 << 20);
    let server = serve_data(data.clone(), |_, n, good| {
        if n == 1 {
            let mut r = Reply::status(429);
            // Two seconds ahead, as an HTTP-date (whole seconds: at least one ahead).
            let when = std::time::SystemTime::now() + Duration::from_secs(2);
            r.headers.push(("Retry-After".into(), http_date(when)));
            r
        } else {
            good
        }
    });
    let opts = RemoteOptions {
        deadline: Duration::from_secs(10),
        ..quick()
    };
    let s = HttpStorage::open(&server.url("x"), &opts).unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 0).unwrap();
    let took = started.elapsed();
    assert_eq!(&buf[..], &data[..4096]);
    assert!(took >= Duration::from_millis(900), "retried after {took:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn retry_after_past_the_deadline_or_unreadable_falls_back_to_backoff() {
    let data = pattern(1 << 20);
    // An hour, a date far ahead, garbage: none can be waited for within a 2 s deadline,
    // so the usual backoff retries, and the server is ready by then.
    for value in ["3600", "Fri, 01 Jan 9999 00:00:00 GMT", "soon", "-1"] {
        let server = serve_data(data.clone(), move |_, n, good| {
            if n == 1 {
                let mut r = Reply::status(503);
                r.headers.push(("Retry-After".into(), value.into()));
                r
            } else {
                good
            }
        });
        let s = HttpStorage::open(&server.url("x"), &quick()).unwrap();
        let started = Instant::now();
        let mut buf = vec![0u8; 4096];
        s.read_at(&mut buf, 0).unwrap();
        let took = started.elapsed();
        assert_eq!(&buf[..], &data[..4096]);
        assert!(took < Duration::from_secs(1), "{value}: took {took:?}");
    }
    // A server that keeps asking for an hour fails by the deadline, not in an hour.
    let server = serve_data(data, |_, _, _| {
        let mut r = Reply::status(503);
        r.headers.push(("Retry-After".into(), "3600".into()));
        r
    });
    let url = server.url("x");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    let started = Instant::now();
    let e = read_error(&s, 4096, 0);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(
        e.contains(&url) && e.contains("503") && e.contains("deadline"),
        "{e}"
    );
}

/// `when` as an HTTP-date (IMF-fixdate), as a server writes Retry-After.
fn http_date(when: std::time::SystemTime) -> String {
    let secs = when
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[test]
fn a_server_that_keeps_failing_fails_by_the_deadline() {
    let server = serve_data(pattern(1 << 20), |_, _, _| Reply::status(503));
    let url = server.url("x");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    let started = Instant::now();
    let e = read_error(&s, 4096, 0);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(
        e.contains(&url) && e.contains("503") && e.contains("attempts"),
        "{e}"
    );
    let attempts = server.requests().len() - 1;
    assert!(attempts >= 3, "{attempts} attempts");
    assert!(e.contains(&format!("after {attempts} attempts")), "{e}");
}

#[test]
fn a_404_names_the_url() {
    let server = Server::start(|_, _| Reply::status(404));
    let url = server.url("missing.qed");
    let e = HttpStorage::open(&url, &quick()).unwrap_err().to_string();
    assert!(e.contains(&url) && e.contains("404"), "{e}");
    // Not retried: it will not get better.
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn a_server_that_stalls_before_answering_fails_by_the_deadline() {
    let server = serve_data(pattern(1 << 20), |_, _, mut good| {
        good.stall_head = Duration::from_secs(30);
        good
    });
    let url = server.url("x");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    let started = Instant::now();
    let e = read_error(&s, 4096, 0);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(e.contains(&url) && e.contains("attempt"), "{e}");
}

#[test]
fn a_server_that_stalls_in_the_body_fails_by_the_deadline() {
    let server = serve_data(pattern(1 << 20), |_, _, mut good| {
        good.stall_body = Duration::from_secs(30);
        good
    });
    let url = server.url("x");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    let started = Instant::now();
    let e = read_error(&s, 4096, 0);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert!(e.contains(&url), "{e}");
}

#[test]
fn a_replaced_object_is_noticed_through_if_match() {
    let old = pattern(1 << 20);
    let new = pattern(1 << 20);
    let server = Server::start(move |req, n| {
        if n < 2 {
            ranged(&old, req, "\"v1\"")
        } else {
            ranged(&new, req, "\"v2\"")
        }
    });
    let url = server.url("base.raw");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 0).unwrap();
    let e = read_error(&s, 4096, 1 << 19);
    assert!(
        e.contains(&url) && e.contains("changed") && e.contains("412"),
        "{e}"
    );
}

#[test]
fn a_replaced_object_is_noticed_through_its_etag() {
    let data = pattern(1 << 20);
    // This server ignores If-Match but tells the new ETag.
    let server = serve_data(data, |_, n, mut good| {
        if n >= 2 {
            for (k, v) in &mut good.headers {
                if k == "ETag" {
                    *v = "\"v2\"".into();
                }
            }
        }
        good
    });
    let url = server.url("base.raw");
    let s = HttpStorage::open(&url, &quick()).unwrap();
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 0).unwrap();
    let e = read_error(&s, 4096, 1 << 19);
    assert!(e.contains(&url) && e.contains("changed"), "{e}");
}

#[test]
fn last_modified_pins_when_there_is_no_etag() {
    let date = "Wed, 21 Oct 2015 07:28:00 GMT";
    let only_date = Server::start(move |req, _| {
        let mut r = ranged(&pattern(1 << 20), req, "\"x\"");
        r.headers.retain(|(k, _)| k != "ETag");
        r.headers.push(("Last-Modified".into(), date.into()));
        r
    });
    let s = HttpStorage::open(&only_date.url("x"), &quick()).unwrap();
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 0).unwrap();
    let reqs = only_date.requests();
    assert_eq!(
        reqs[1]
            .headers
            .get("if-unmodified-since")
            .map(String::as_str),
        Some(date)
    );
    assert!(!reqs[1].headers.contains_key("if-match"));
}

#[test]
fn names_that_are_neither_urls_nor_files_are_refused_clearly() {
    let e = open_device(
        Path::new("no/such/image.qed"),
        None,
        &OpenOptions::read_only(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("no/such/image.qed") && e.contains("No such file"),
        "{e}"
    );
    let e = open_device(
        Path::new("ftp://host/base.qed"),
        None,
        &OpenOptions::read_only(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("ftp://host/base.qed") && e.contains("http://") && e.contains("s3://"),
        "{e}"
    );
}

#[test]
fn remote_images_open_read_only_only() {
    let server = serve_data(pattern(1 << 20), |_, _, good| good);
    let url = server.url("base.raw");
    let e = open_device(Path::new(&url), None, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&url) && e.contains("read-only"), "{e}");
    let dev = open_device(Path::new(&url), None, &OpenOptions::read_only()).unwrap();
    assert_eq!(dev.size(), 1 << 20);
    assert_eq!(dev.format(), qed::Format::Raw);
}

#[test]
fn an_overlay_reads_a_qed_base_over_http_and_writes_locally() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.qed");
    Image::create(&base_path, &CreateOptions::new(16 << 20)).unwrap();
    let contents = pattern(1 << 20);
    {
        let base = Image::open(&base_path, &OpenOptions::default()).unwrap();
        base.write_at(&contents, 3 << 20).unwrap();
        base.close().unwrap();
    }
    let bytes = Arc::new(std::fs::read(&base_path).unwrap());
    let server = serve_data(bytes, |_, _, good| good);
    let url = server.url("base.qed");

    let top_path = dir.path().join("top.qed");
    let mut create = CreateOptions::new(16 << 20);
    create.backing_file = Some(url.clone());
    create.backing_format = Some(qed::Format::Qed);
    Image::create(&top_path, &create).unwrap();
    let top = Image::open(&top_path, &OpenOptions::default()).unwrap();
    assert_eq!(top.backing_file().unwrap().path, Path::new(&url));
    let mut buf = vec![0u8; 1 << 20];
    top.read_at(&mut buf, 3 << 20).unwrap();
    assert!(buf == *contents);
    top.write_at(&[7u8; 4096], 3 << 20).unwrap();
    top.read_at(&mut buf, 3 << 20).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 7));
    assert_eq!(&buf[4096..], &contents[4096..]);
    top.close().unwrap();
    // Unallocated clusters of the base read as zeros.
    let top = Image::open(&top_path, &OpenOptions::read_only()).unwrap();
    top.read_at(&mut buf, 8 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn concurrent_readers_of_a_chunk_fetch_it_once() {
    let data = pattern(4 << 20);
    // Slow answers, so that the readers' requests would overlap.
    let server = serve_data(data.clone(), |_, _, mut good| {
        good.stall_head = Duration::from_millis(200);
        good
    });
    let s = HttpStorage::open(&server.url("disk.raw"), &quick()).unwrap();
    thread::scope(|scope| {
        for i in 0..8u64 {
            let (s, data) = (&s, &data);
            scope.spawn(move || {
                let off = (1 << 20) + i * 4096;
                let mut buf = vec![0u8; 4096];
                s.read_at(&mut buf, off).unwrap();
                assert_eq!(buf, data[off as usize..off as usize + 4096]);
            });
        }
    });
    // Each chunk crosses the wire once (the readers read on from each other, so the
    // next chunks may be read ahead, once).
    let reads: Vec<_> = server.requests()[1..].iter().map(|r| r.range).collect();
    let mut seen = std::collections::HashSet::new();
    for &(a, b) in reads.iter().flatten() {
        for chunk in a / (64 << 10)..=b / (64 << 10) {
            assert!(seen.insert(chunk), "chunk {chunk} fetched twice: {reads:?}");
        }
    }
    assert!(seen.contains(&((1 << 20) / (64 << 10))), "{reads:?}");
}

// S3: the same ranged GETs, signed, with XML error replies.

fn s3_config(server: &Server, signed: bool) -> S3Config {
    S3Config {
        endpoint: Some(format!("http://127.0.0.1:{}", server.port)),
        region: "eu-west-3".into(),
        credentials: signed.then(|| S3Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: Some("session".into()),
        }),
    }
}

/// The value of query parameter `name` in a request target.
fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    target
        .split_once('?')?
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

fn s3_error(status: u16, code: &str, message: &str) -> Reply {
    let mut r = Reply::status(status);
    r.headers
        .push(("Content-Type".into(), "application/xml".into()));
    r.body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message><RequestId>1</RequestId></Error>"
    )
    .into_bytes();
    r
}

#[test]
fn s3_requests_address_the_bucket_by_path_and_each_is_signed_anew() {
    let data = pattern(1 << 20);
    // The first read is told to come back in 2 s: its retry must be signed then.
    let server = serve_data(data.clone(), |_, n, good| {
        if n == 1 {
            let mut r = s3_error(503, "SlowDown", "Please reduce your request rate.");
            r.headers.push(("Retry-After".into(), "2".into()));
            r
        } else {
            good
        }
    });
    let url = "s3://bucket/dir/disk image.raw";
    let opts = RemoteOptions {
        deadline: Duration::from_secs(10),
        ..quick()
    };
    let s = S3Storage::open_with(url, &s3_config(&server, true), &opts).unwrap();
    assert_eq!(s.url(), url);
    assert_eq!(s.len().unwrap(), 1 << 20);
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 8192).unwrap();
    assert_eq!(&buf[..], &data[8192..12288]);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    for r in &reqs {
        let (path, _) = r.target.split_once('?').unwrap();
        assert_eq!(path, "/bucket/dir/disk%20image.raw");
        assert_eq!(
            query_param(&r.target, "X-Amz-Algorithm"),
            Some("AWS4-HMAC-SHA256")
        );
        assert!(
            query_param(&r.target, "X-Amz-Credential")
                .unwrap()
                .contains("%2Feu-west-3%2Fs3%2Faws4_request"),
            "{}",
            r.target
        );
        assert_eq!(
            query_param(&r.target, "X-Amz-Security-Token"),
            Some("session")
        );
        assert!(query_param(&r.target, "X-Amz-Signature").is_some());
        assert!(
            !r.target.contains("wJalr"),
            "the secret was sent: {}",
            r.target
        );
    }
    // The retry 2 s later carries a signature of its own time.
    let date = |r: &Request| query_param(&r.target, "X-Amz-Date").unwrap().to_string();
    assert!(
        date(&reqs[2]) > date(&reqs[1]),
        "{} {}",
        date(&reqs[1]),
        date(&reqs[2])
    );
    assert_ne!(
        query_param(&reqs[1].target, "X-Amz-Signature"),
        query_param(&reqs[2].target, "X-Amz-Signature")
    );
    // Pinned like any ranged GET.
    assert_eq!(
        reqs[2].headers.get("if-match").map(String::as_str),
        Some("\"v1\"")
    );
}

#[test]
fn s3_requests_without_credentials_are_anonymous() {
    let data = pattern(1 << 20);
    let server = serve_data(data.clone(), |_, _, good| good);
    let s = S3Storage::open_with("s3://pub/k", &s3_config(&server, false), &quick()).unwrap();
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..], &data[..4096]);
    for r in server.requests() {
        assert_eq!(r.target, "/pub/k");
        assert!(!r.headers.contains_key("authorization"));
    }
}

#[test]
fn s3_error_replies_say_what_to_check() {
    let cases: Vec<(Reply, bool, &[&str])> = vec![
        (
            s3_error(404, "NoSuchBucket", "The specified bucket does not exist"),
            true,
            &[
                "bucket 'bucket' does not exist",
                "NoSuchBucket",
                "AWS_ENDPOINT_URL_S3",
            ],
        ),
        (
            s3_error(404, "NoSuchKey", "The specified key does not exist."),
            true,
            &["no object 'dir/k'", "NoSuchKey", "check the key"],
        ),
        (
            s3_error(
                403,
                "InvalidAccessKeyId",
                "The AWS Access Key Id you provided does not exist in our records.",
            ),
            true,
            &[
                "InvalidAccessKeyId",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
            ],
        ),
        (
            s3_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match &amp; so on",
            ),
            true,
            &[
                "SignatureDoesNotMatch",
                "does not match & so on",
                "AWS_SECRET_ACCESS_KEY",
            ],
        ),
        (
            s3_error(403, "AccessDenied", "Access Denied"),
            false,
            &["access denied", "anonymous", "AWS_ACCESS_KEY_ID"],
        ),
        (
            s3_error(400, "ExpiredToken", "The provided token has expired."),
            true,
            &["ExpiredToken", "AWS_SESSION_TOKEN"],
        ),
        (
            s3_error(
                400,
                "AuthorizationHeaderMalformed",
                "the region 'eu-west-3' is wrong; expecting 'us-west-2'",
            ),
            true,
            &["AWS_REGION", "eu-west-3"],
        ),
        // Garbage where XML should be: the status still speaks.
        (
            Reply {
                body: b"\xff\x00<Code>\x01<html>".repeat(1000),
                ..Reply::status(403)
            },
            true,
            &["403", "AWS_ACCESS_KEY_ID"],
        ),
        (
            Reply {
                body: vec![b'<'; 8 << 20],
                ..Reply::status(404)
            },
            true,
            &["404", "no object 'dir/k'"],
        ),
    ];
    for (reply, signed, wants) in cases {
        let reply = Arc::new(Mutex::new(Some(reply)));
        let server = Server::start(move |_, _| {
            reply
                .lock()
                .unwrap()
                .take()
                .unwrap_or_else(|| Reply::status(599))
        });
        let url = "s3://bucket/dir/k";
        let started = Instant::now();
        let e = S3Storage::open_with(url, &s3_config(&server, signed), &quick())
            .unwrap_err()
            .to_string();
        eprintln!("MSG {e}");
        assert!(e.starts_with(url), "{e}");
        for want in wants {
            assert!(e.contains(want), "{want:?} not in: {e}");
        }
        assert!(e.len() < 1000, "{e}");
        // Not retried: they will not get better.
        assert_eq!(server.requests().len(), 1, "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

#[test]
fn s3_throttling_is_retried() {
    let data = pattern(1 << 20);
    let server = serve_data(data.clone(), |_, n, good| match n {
        1 => s3_error(503, "SlowDown", "Please reduce your request rate."),
        2 => s3_error(500, "InternalError", "We encountered an internal error."),
        3 => Reply::status(429),
        _ => good,
    });
    let s = S3Storage::open_with("s3://b/k", &s3_config(&server, true), &quick()).unwrap();
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 4096).unwrap();
    assert_eq!(&buf[..], &data[4096..8192]);
    assert_eq!(server.requests().len(), 5);

    // Throttled for good: the message says so, by the deadline.
    let server = serve_data(data, |_, _, _| {
        s3_error(503, "SlowDown", "Please reduce your request rate.")
    });
    let s = S3Storage::open_with("s3://b/k", &s3_config(&server, true), &quick()).unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let e = s.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(
        e.starts_with("s3://b/k") && e.contains("SlowDown") && e.contains("deadline"),
        "{e}"
    );
}

#[test]
fn s3_names_that_cannot_be_objects_are_refused() {
    let server = serve_data(pattern(1 << 20), |_, _, good| good);
    for (url, want) in [
        ("s3://bucket", "no key"),
        ("s3://bucket/", "no key"),
        ("s3://bu/cket/../k", "'..'"),
        ("s3://b@d/k", "not a bucket name"),
    ] {
        let e = S3Storage::open_with(url, &s3_config(&server, true), &quick())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(url) && e.contains(want), "{e}");
    }
    assert!(server.requests().is_empty());
}

#[test]
fn absurd_settings_are_refused_or_cost_nothing_up_front() {
    let data = pattern(1 << 20);
    let server = serve_data(data.clone(), |_, _, good| good);
    let url = server.url("disk.raw");
    let forever = RemoteOptions {
        deadline: Duration::from_secs(u64::MAX / 4),
        ..quick()
    };
    let e = HttpStorage::open(&url, &forever).unwrap_err().to_string();
    assert!(e.contains("deadline"), "{e}");
    // A cache bound of most of the address space reserves nothing until used.
    let huge = RemoteOptions {
        cache_bytes: usize::MAX / 2,
        ..quick()
    };
    let s = HttpStorage::open(&url, &huge).unwrap();
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 8192).unwrap();
    assert_eq!(buf, data[8192..8192 + 4096]);
}

/// Messages a [`qed::RemoteReport`] was given.
fn collect_reports() -> (qed::RemoteReport, Arc<Mutex<Vec<String>>>) {
    let said = Arc::new(Mutex::new(Vec::new()));
    let into = said.clone();
    let report = qed::RemoteReport::new(move |m| into.lock().unwrap().push(m.to_string()));
    (report, said)
}

#[test]
fn readers_that_start_during_an_outage_share_its_deadline() {
    // The server answers the open, then fails every read: the outage starts with the
    // first read, and every reader gives up at its deadline, however late it started
    // (a worker reaching its next read, or a reader that waited for a chunk another
    // reader was fetching and then fetches it itself).
    let server = serve_data(pattern(4 << 20), |_, _, _| Reply::status(503));
    let url = server.url("x");
    let opts = RemoteOptions {
        deadline: Duration::from_secs(3),
        readahead: 0,
        ..quick()
    };
    let s = Arc::new(HttpStorage::open(&url, &opts).unwrap());
    let started = Instant::now();
    let reader = |offset: u64, after: Duration| {
        let s = s.clone();
        thread::spawn(move || {
            thread::sleep(after);
            let mut buf = vec![0u8; 4096];
            let e = s.read_at(&mut buf, offset).unwrap_err().to_string();
            (e, started.elapsed())
        })
    };
    let first = reader(0, Duration::ZERO);
    let waiter = reader(0, Duration::from_millis(300));
    let late = reader(2 << 20, Duration::from_millis(2000));
    for (who, handle) in [("first", first), ("waiter", waiter), ("late", late)] {
        let (e, at) = handle.join().unwrap();
        assert!(e.contains(&url) && e.contains("503"), "{who}: {e}");
        // A deadline of their own would have taken them to 3.3 s and 5 s.
        assert!(
            at < Duration::from_millis(3000 + 700),
            "{who} gave up after {at:?}, with a deadline of 3 s"
        );
    }
}

#[test]
fn a_server_that_stops_answering_is_reported_once_and_its_return_too() {
    let down = Arc::new(AtomicBool::new(true));
    let is_down = down.clone();
    let server = serve_data(pattern(1 << 20), move |_, _, good| {
        if is_down.load(Ordering::Relaxed) {
            Reply::status(503)
        } else {
            good
        }
    });
    let url = server.url("x");
    let (report, said) = collect_reports();
    let opts = RemoteOptions {
        report,
        readahead: 0,
        ..quick()
    };
    let s = HttpStorage::open(&url, &opts).unwrap();
    assert!(
        said.lock().unwrap().is_empty(),
        "{:?}",
        said.lock().unwrap()
    );
    let e = read_error(&s, 4096, 0);
    assert!(e.contains("503"), "{e}");
    let attempts = server.requests().len() - 1;
    assert!(attempts >= 3, "{attempts} attempts");
    {
        let said = said.lock().unwrap();
        assert_eq!(said.len(), 1, "once, not per retry: {said:?}");
        assert!(
            said[0].starts_with(&format!("{url}: ")) && said[0].contains("503"),
            "{said:?}"
        );
        assert!(said[0].contains("retrying until 2 s"), "{said:?}");
    }
    // Back: a read past the deadline still makes an attempt, which works, and the
    // return is said once too.
    down.store(false, Ordering::Relaxed);
    let mut buf = vec![0u8; 4096];
    s.read_at(&mut buf, 64 << 10).unwrap();
    assert_eq!(&buf[..], &pattern(1 << 20)[64 << 10..(64 << 10) + 4096]);
    {
        let said = said.lock().unwrap();
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said[1].starts_with(&format!("{url}: the server answers again")),
            "{said:?}"
        );
    }

    // Down for a few attempts inside one read: it retries, succeeds, and says both.
    let server = serve_data(pattern(1 << 20), |_, n, good| {
        if n <= 3 {
            Reply::status(503)
        } else {
            good
        }
    });
    let url = server.url("x");
    let (report, said) = collect_reports();
    let opts = RemoteOptions {
        report,
        readahead: 0,
        ..quick()
    };
    let s = HttpStorage::open(&url, &opts).unwrap();
    s.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..], &pattern(1 << 20)[..4096]);
    assert_eq!(server.requests().len(), 5);
    let said = said.lock().unwrap();
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(
        said[0].starts_with(&format!("{url}: "))
            && said[0].contains("503")
            && said[0].contains("retrying"),
        "{said:?}"
    );
    assert!(said[1].contains("answers again"), "{said:?}");
}

#[test]
fn a_refused_connection_names_the_s3_endpoint_and_is_reported_once() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}/");
    let config = S3Config {
        endpoint: Some(endpoint.clone()),
        region: "us-east-1".into(),
        credentials: None,
    };
    let (report, said) = collect_reports();
    let opts = RemoteOptions {
        report,
        deadline: Duration::from_millis(1500),
        ..quick()
    };
    let started = Instant::now();
    let e = S3Storage::open_with("s3://b/k", &config, &opts)
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(
        e.starts_with("s3://b/k: ")
            && e.contains(&format!("(endpoint {endpoint})"))
            && e.contains("deadline"),
        "{e}"
    );
    let said = said.lock().unwrap();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].starts_with("s3://b/k: ")
            && said[0].contains(&format!("(endpoint {endpoint})"))
            && said[0].contains("retrying until 1.5 s"),
        "{said:?}"
    );
}

#[test]
fn a_pin_that_does_not_fit_is_refused_at_create_and_garbage_after_the_name_is_no_pin() {
    let data = pattern(1 << 20);
    let server = serve_data(data.clone(), |_, _, good| good);
    let dir = tempfile::tempdir().unwrap();
    // A 4 KiB header cluster with a name that leaves no room for the record.
    let url = server.url(&"n".repeat(3990));
    let pin = HttpStorage::open(&url, &quick())
        .unwrap()
        .remote_identity()
        .unwrap();
    assert_eq!(pin.etag.as_deref(), Some("\"v1\""));
    assert_eq!(pin.size, 1 << 20);
    let mut opts = CreateOptions::new(1 << 20);
    opts.cluster_size = 4096;
    opts.backing_file = Some(url.clone());
    let top = dir.path().join("top.qed");
    let e = Image::create_pinned(&top, &opts, Some(&pin))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no room") && e.contains("cluster_size"), "{e}");
    assert!(!top.exists(), "a refused create made the file");

    // Without a pin it is made; whatever follows the name is no record: the overlay
    // opens, and a read-write open cannot pin it (no room) but is not refused.
    Image::create(&top, &opts).unwrap();
    let mut bytes = std::fs::read(&top).unwrap();
    let end = 64 + url.len();
    for b in &mut bytes[end..4096] {
        *b = 0xa5;
    }
    bytes[end.next_multiple_of(8)..][..8].copy_from_slice(b"QEDpin\0\x01");
    std::fs::write(&top, &bytes).unwrap();
    let ro = OpenOptions {
        remote: quick(),
        ..OpenOptions::read_only()
    };
    let image = Image::open(&top, &ro).unwrap();
    assert_eq!(image.base_pin().unwrap(), None);
    drop(image);
    let rw = OpenOptions {
        remote: quick(),
        ..OpenOptions::default()
    };
    let image = Image::open(&top, &rw).unwrap();
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, 8192).unwrap();
    assert_eq!(&buf[..], &data[8192..8192 + 4096]);
    assert_eq!(image.base_pin().unwrap(), None);
}
