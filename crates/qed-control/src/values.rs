//! The values commands take and return, as the control API has them: a command's
//! arguments ([`Argument`]) and its `return` member ([`Return`]). The JSON they travel
//! as stays inside this crate.

use crate::jobs::{JobInfo, JobStatus};
use serde_json::{json, Map, Value};
use std::fmt;

/// One argument a client sends with a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Argument {
    /// A string (a job id, a file name).
    String(String),
    /// An integer from 0 to 2^64 - 1 (a rate).
    Integer(u64),
}

impl From<&str> for Argument {
    fn from(s: &str) -> Self {
        Argument::String(s.to_string())
    }
}

impl From<String> for Argument {
    fn from(s: String) -> Self {
        Argument::String(s)
    }
}

impl From<u64> for Argument {
    fn from(n: u64) -> Self {
        Argument::Integer(n)
    }
}

/// The arguments as the request carries them: a JSON object.
pub(crate) fn arguments_json(arguments: &[(&str, Argument)]) -> Value {
    let map: Map<String, Value> = arguments
        .iter()
        .map(|(name, value)| {
            let value = match value {
                Argument::String(s) => Value::from(s.as_str()),
                Argument::Integer(n) => Value::from(*n),
            };
            (name.to_string(), value)
        })
        .collect();
    Value::Object(map)
}

/// What a command returned (QMP's `return` member). A command adds its own with
/// [`Return::empty`] or [`Return::job_started`]; a client reads one with
/// [`Return::job_id`] and [`Return::jobs`], or prints it as the JSON it came as.
#[derive(Debug, Clone, PartialEq)]
pub struct Return(Value);

impl Return {
    /// `{}`: done, nothing to tell.
    pub fn empty() -> Self {
        Return(json!({}))
    }

    /// `{"id": ID}`: the job `id` started.
    pub fn job_started(id: &str) -> Self {
        Return(json!({ "id": id }))
    }

    /// The id of the job a command started (the `id` member), if it is one.
    pub fn job_id(&self) -> Option<&str> {
        self.0.get("id").and_then(Value::as_str)
    }

    /// The jobs `query-jobs` returned; `None` when this is no such list.
    pub fn jobs(&self) -> Option<Vec<JobInfo>> {
        self.0.as_array()?.iter().map(parse_job).collect()
    }

    /// The value as indented JSON, for people.
    pub fn pretty(&self) -> String {
        serde_json::to_string_pretty(&self.0).unwrap_or_else(|_| self.0.to_string())
    }

    pub(crate) fn from_json(value: Value) -> Self {
        Return(value)
    }

    pub(crate) fn into_json(self) -> Value {
        self.0
    }
}

impl fmt::Display for Return {
    /// The value as compact JSON.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A job as `query-jobs` lists it (QEMU's JobInfo).
pub(crate) fn job_json(info: &JobInfo) -> Value {
    let mut v = json!({
        "id": info.id,
        "type": info.kind,
        "status": info.status.as_str(),
        "current-progress": info.current,
        "total-progress": info.total,
    });
    if let (Some(e), Value::Object(m)) = (&info.error, &mut v) {
        m.insert("error".into(), Value::String(e.clone()));
    }
    v
}

/// Reads one job of `query-jobs`' list.
fn parse_job(j: &Value) -> Option<JobInfo> {
    Some(JobInfo {
        id: j.get("id")?.as_str()?.to_string(),
        kind: j.get("type")?.as_str()?.to_string(),
        status: match j.get("status")?.as_str()? {
            "concluded" | "null" => JobStatus::Concluded,
            _ => JobStatus::Running,
        },
        current: j.get("current-progress")?.as_u64()?,
        total: j.get("total-progress")?.as_u64()?,
        error: j.get("error").and_then(Value::as_str).map(str::to_string),
    })
}
