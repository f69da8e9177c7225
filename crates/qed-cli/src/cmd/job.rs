//! `qed job`: a thin client of `qed serve --control`, for people and scripts.

use crate::outcome::{name, outcome};
use crate::progress::ProgressReport;
use crate::Output;
use anyhow::{anyhow, Context, Result};
use qed_control::{Argument, Client, ClientError, JobInfo, JobStatus, Return, CANCELLED};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a waiting client asks for the job's progress.
const POLL: Duration = Duration::from_millis(100);

/// Start, watch and cancel jobs in a running `qed serve`, through its control socket
/// (`qed serve --control SOCKET`).
#[derive(clap::Args)]
pub struct Args {
    /// The control socket.
    socket: PathBuf,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Start a stream: copy what the image reads from its backing chain into it, then
    /// drop the backing file (or every backing file above -b BASE). Prints the job's id.
    Stream(StreamArgs),
    /// Start a compaction: move clusters into free space and cut the file. Prints the
    /// job's id.
    Compact(StartArgs),
    /// Start a defragmentation: lay the clusters out in guest order, tables together.
    /// Prints the job's id.
    Defrag(StartArgs),
    /// List the jobs: id, type, status, progress, and the error of a failed one.
    Query {
        /// human, or json (query-jobs' return value as the server sent it).
        #[arg(long = "output", value_enum, default_value_t = Output::Human)]
        output: Output,
    },
    /// Ask a running job to stop.
    Cancel {
        /// Wait until the job has stopped.
        #[arg(long = "wait")]
        wait: bool,
        /// The job's id.
        id: String,
    },
    /// Forget a concluded job.
    Dismiss {
        /// The job's id.
        id: String,
    },
}

#[derive(clap::Args)]
struct StreamArgs {
    /// Keep this backing file (one of the chain's), streaming only what lies above it.
    #[arg(short = 'b')]
    base: Option<String>,
    /// Copy at most this many bytes per second (k, M, G suffixes).
    #[arg(long = "rate", value_parser = crate::values::rate)]
    rate: Option<u64>,
    #[command(flatten)]
    start: StartArgs,
}

/// What every job start takes.
#[derive(clap::Args)]
struct StartArgs {
    /// The job's id (generated when left out).
    #[arg(long = "id")]
    id: Option<String>,
    /// Show progress until the job concludes (implies --wait).
    #[arg(short = 'p')]
    progress: bool,
    /// Wait until the job concludes; exit 1 if it did not complete.
    #[arg(long = "wait")]
    wait: bool,
}

/// Runs `qed job`: 0 on success, 1 when the server refused or a waited-for job failed.
pub fn run(a: Args) -> Result<u8> {
    let mut client = connect(&a.socket)?;
    match a.action {
        Action::Stream(s) => stream(&mut client, &a.socket, s),
        Action::Compact(s) => start(&mut client, &a.socket, "compact", Vec::new(), s),
        Action::Defrag(s) => start(&mut client, &a.socket, "defrag", Vec::new(), s),
        Action::Query { output } => query(&mut client, output),
        Action::Cancel { wait, id } => {
            call(&mut client, "job-cancel", &[("id", id.as_str().into())])?;
            if !wait {
                return Ok(0);
            }
            let job = wait_for(&mut client, &id, &mut ProgressReport::new(false))?;
            match job.error.as_deref() {
                None => eprintln!(
                    "qed: {}: it completed before the cancel took effect",
                    name(&job)
                ),
                Some(CANCELLED) => {}
                Some(_) => {
                    eprintln!("qed: {}", outcome(&job));
                    return Ok(1);
                }
            }
            Ok(0)
        }
        Action::Dismiss { id } => {
            call(&mut client, "job-dismiss", &[("id", id.as_str().into())])?;
            Ok(0)
        }
    }
}

fn connect(socket: &Path) -> Result<Client> {
    Client::connect(socket).map_err(|e| match e {
        ClientError::Io(e) => anyhow!(e),
        e => anyhow!("{}: {e}", socket.display()),
    })
}

/// Runs a command; a refusal becomes an error carrying the server's description.
fn call(client: &mut Client, command: &str, arguments: &[(&str, Argument)]) -> Result<Return> {
    client.execute(command, arguments).map_err(|e| anyhow!(e))
}

fn stream(client: &mut Client, socket: &Path, s: StreamArgs) -> Result<u8> {
    let mut args = Vec::new();
    if let Some(base) = s.base {
        // The server would resolve a relative path against its own directory: a file
        // named here is sent as the file it is here.
        let here = (!qed::is_remote_name(&base))
            .then(|| std::fs::canonicalize(&base).ok())
            .flatten()
            .and_then(|p| p.to_str().map(str::to_string));
        args.push(("base", here.unwrap_or(base).into()));
    }
    if let Some(rate) = s.rate {
        args.push(("rate", rate.into()));
    }
    start(client, socket, "stream", args, s.start)
}

/// Starts the job `command` with `args` (and the id asked for), prints its id, and
/// waits for it when asked to.
fn start(
    client: &mut Client,
    socket: &Path,
    command: &str,
    mut args: Vec<(&str, Argument)>,
    s: StartArgs,
) -> Result<u8> {
    if let Some(id) = s.id {
        args.push(("job-id", id.into()));
    }
    let started = call(client, command, &args)?;
    let id = started
        .job_id()
        .with_context(|| format!("{}: {command} returned {started}", socket.display()))?
        .to_string();
    println!("{id}");
    if !(s.wait || s.progress) {
        return Ok(0);
    }
    let mut progress = ProgressReport::new(s.progress);
    let job = wait_for(client, &id, &mut progress)?;
    progress.finish();
    if job.error.is_some() {
        eprintln!("qed: {}", outcome(&job));
        return Ok(1);
    }
    Ok(0)
}

/// Polls until the job `id` concludes; returns it as it concluded.
fn wait_for(client: &mut Client, id: &str, progress: &mut ProgressReport) -> Result<JobInfo> {
    loop {
        let jobs = client
            .query_jobs()
            .map_err(|e| anyhow!("lost track of job '{id}': {e}"))?;
        let job = jobs
            .into_iter()
            .find(|j| j.id == id)
            .ok_or_else(|| anyhow!("job '{id}' is gone (dismissed before it was seen to end)"))?;
        progress.update(job.current, job.total);
        if job.status == JobStatus::Concluded {
            return Ok(job);
        }
        std::thread::sleep(POLL);
    }
}

fn query(client: &mut Client, output: Output) -> Result<u8> {
    let v = call(client, "query-jobs", &[])?;
    if output == Output::Json {
        println!("{}", v.pretty());
        return Ok(0);
    }
    let jobs = v.jobs().ok_or_else(|| anyhow!("query-jobs returned {v}"))?;
    if jobs.is_empty() {
        println!("No jobs");
        return Ok(0);
    }
    let width = jobs.iter().map(|j| j.id.len()).max().unwrap_or(0).max(2);
    println!("{:width$}  {:8}  {:10}  PROGRESS", "ID", "TYPE", "STATUS");
    for j in &jobs {
        let pct = j
            .current
            .saturating_mul(100)
            .checked_div(j.total)
            .unwrap_or(0);
        let mut line = format!(
            "{:width$}  {:8}  {:10}  {}/{} ({pct}%)",
            j.id,
            j.kind,
            j.status.as_str(),
            j.current,
            j.total
        );
        if let Some(e) = &j.error {
            line.push_str(&format!("  error: {e}"));
        }
        println!("{line}");
    }
    Ok(0)
}
