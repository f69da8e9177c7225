//! The control socket over a real Unix socket: its file, its bound on clients, and jobs
//! driven through the client.

use qed_control::{
    Client, ClientError, Commands, ControlServer, ErrorClass, JobEnd, JobSpec, JobStatus, Jobs,
    Return, MAX_CONNECTIONS,
};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

fn server(path: &std::path::Path) -> (Arc<Jobs>, ControlServer) {
    let jobs = Jobs::new();
    let mut commands = Commands::new(jobs.clone());
    let j = jobs.clone();
    // A job kind of the test's own: runs until cancelled.
    commands.add("spin", &["target"], move |args| {
        let spec = JobSpec {
            kind: "spin".into(),
            id: None,
            target: args.required_string("target")?.to_string(),
        };
        let id = j.start(spec, |c| {
            c.set_progress(1, 2);
            while !c.is_cancelled() {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(JobEnd::Cancelled)
        })?;
        Ok(Return::job_started(&id))
    });
    let s = ControlServer::start(path, Arc::new(commands)).unwrap();
    (jobs, s)
}

#[test]
fn socket_file_stale_live_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("c.sock");
    // A socket file nobody listens on any more is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let (_jobs, s) = server(&path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A live one is refused, and left alone.
    let err = ControlServer::start(&path, Arc::new(Commands::new(Jobs::new())))
        .err()
        .expect("a second server on a live socket");
    assert!(err.to_string().contains("in use"), "{err}");
    Client::connect(&path).unwrap();
    s.stop();
    assert!(!path.exists());
    // Something else in the way is refused.
    std::fs::write(&path, b"x").unwrap();
    let err = ControlServer::start(&path, Arc::new(Commands::new(Jobs::new())))
        .err()
        .expect("a file in the way");
    assert!(err.to_string().contains("not a socket"), "{err}");
}

#[test]
fn clients_past_the_bound_are_turned_away() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("c.sock");
    let (_jobs, s) = server(&path);
    let held: Vec<Client> = (0..MAX_CONNECTIONS)
        .map(|_| Client::connect(&path).unwrap())
        .collect();
    let extra = UnixStream::connect(&path).unwrap();
    let mut lines = BufReader::new(extra).lines();
    assert!(lines.next().unwrap().unwrap().contains("\"QMP\""));
    let refusal = lines.next().unwrap().unwrap();
    assert!(
        refusal.contains("too many control connections"),
        "{refusal}"
    );
    match Client::connect(&path) {
        Err(ClientError::Server(e)) => assert!(e.desc.contains("too many")),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a client past the bound was served"),
    }
    // Once one leaves, another is served.
    drop(held);
    let mut ok = false;
    for _ in 0..100 {
        if Client::connect(&path).is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ok, "no client served after the others left");
    s.stop();
}

#[test]
fn jobs_through_the_client() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("c.sock");
    let (jobs, s) = server(&path);
    let mut c = Client::connect(&path).unwrap();
    let started = c.execute("spin", &[("target", "t".into())]).unwrap();
    let id = started.job_id().unwrap().to_string();
    let busy = c.execute("spin", &[("target", "t".into())]).unwrap_err();
    assert!(matches!(&busy, ClientError::Server(e) if e.desc.contains("busy")));
    // The job reports its progress from its own thread, soon.
    let mut progressed = false;
    for _ in 0..200 {
        let list = c.query_jobs().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].status, JobStatus::Running);
        if (list[0].current, list[0].total) == (1, 2) {
            progressed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(progressed, "no progress reported");
    c.execute("job-cancel", &[("id", id.as_str().into())])
        .unwrap();
    let mut concluded = false;
    for _ in 0..200 {
        let j = &c.query_jobs().unwrap()[0];
        if j.status == JobStatus::Concluded {
            assert_eq!(j.error.as_deref(), Some(qed_control::CANCELLED));
            concluded = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(concluded);
    match c.execute("nope", &[]) {
        Err(ClientError::Server(e)) => assert_eq!(e.class, ErrorClass::CommandNotFound),
        other => panic!("{other:?}"),
    }
    c.execute("job-dismiss", &[("id", id.as_str().into())])
        .unwrap();
    assert!(c.query_jobs().unwrap().is_empty());
    // Stopping closes connections a client still holds.
    s.stop();
    assert!(c.query_jobs().is_err());
    jobs.close();
    jobs.wait();
}
