//! The commands a control socket answers: QMP's job commands over a [`Jobs`] registry,
//! and whatever commands an export adds (the commands that start jobs).

use crate::error::ControlError;
use crate::jobs::Jobs;
use crate::values::{job_json, Return};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A command's arguments, with getters that answer a wrong type or a missing argument
/// as QEMU does. Unexpected arguments never reach a command: they are refused first.
#[derive(Debug)]
pub struct Arguments {
    map: Map<String, Value>,
}

impl Arguments {
    /// The string argument `name`; `None` when absent (or null).
    pub fn string(&self, name: &str) -> Result<Option<&str>, ControlError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_type(name, "string")),
        }
    }

    /// The string argument `name`, which must be given.
    pub fn required_string(&self, name: &str) -> Result<&str, ControlError> {
        self.string(name)?.ok_or_else(|| missing(name))
    }

    /// The argument `name` as an integer from 0 to 2^64 - 1; `None` when absent (or null).
    pub fn u64(&self, name: &str) -> Result<Option<u64>, ControlError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                ControlError::generic(format!(
                    "Invalid parameter type for '{name}', expected: integer from 0 to \
                     18446744073709551615"
                ))
            }),
        }
    }
}

fn wrong_type(name: &str, ty: &str) -> ControlError {
    ControlError::generic(format!(
        "Invalid parameter type for '{name}', expected: {ty}"
    ))
}

fn missing(name: &str) -> ControlError {
    ControlError::generic(format!("Parameter '{name}' is missing"))
}

/// A command as the table keeps it: its return value already the JSON it travels as.
type Handler = Box<dyn Fn(&Arguments) -> Result<Value, ControlError> + Send + Sync>;

struct Command {
    params: Vec<&'static str>,
    handler: Handler,
}

/// The command table of one control socket.
pub struct Commands {
    jobs: Arc<Jobs>,
    table: BTreeMap<String, Command>,
}

impl Commands {
    /// The built-in commands over `jobs`: `qmp_capabilities`, `query-commands`,
    /// `query-jobs`, `job-cancel` and `job-dismiss`.
    pub fn new(jobs: Arc<Jobs>) -> Self {
        let mut c = Self {
            jobs: jobs.clone(),
            table: BTreeMap::new(),
        };
        c.add("qmp_capabilities", &["enable"], |args| {
            // No capability is offered, so the only acceptable list is an empty one.
            match args.map.get("enable") {
                None | Some(Value::Null) => {}
                Some(Value::Array(a)) if a.is_empty() => {}
                Some(Value::Array(a)) => {
                    let first = a.first().and_then(Value::as_str).unwrap_or("?");
                    return Err(ControlError::generic(format!(
                        "Capability '{first}' not available"
                    )));
                }
                Some(_) => return Err(wrong_type("enable", "array")),
            }
            Ok(Return::empty())
        });
        let j = jobs.clone();
        c.add("query-jobs", &[], move |_| {
            Ok(Return::from_json(Value::Array(
                j.list().iter().map(job_json).collect(),
            )))
        });
        let j = jobs.clone();
        c.add("job-cancel", &["id"], move |args| {
            j.cancel(args.required_string("id")?)?;
            Ok(Return::empty())
        });
        c.add("job-dismiss", &["id"], move |args| {
            jobs.dismiss(args.required_string("id")?)?;
            Ok(Return::empty())
        });
        c
    }

    /// The registry the commands act on, for commands that start jobs.
    pub fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// Adds (or replaces) the command `name`, which takes the arguments `params` (all
    /// optional as far as the table is concerned: `handler` asks for the ones it needs).
    pub fn add(
        &mut self,
        name: &str,
        params: &[&'static str],
        handler: impl Fn(&Arguments) -> Result<Return, ControlError> + Send + Sync + 'static,
    ) {
        self.table.insert(
            name.to_string(),
            Command {
                params: params.to_vec(),
                handler: Box::new(move |args| handler(args).map(Return::into_json)),
            },
        );
    }

    /// Runs the command `name` with `arguments`; the `return` value, or the error.
    pub(crate) fn execute(
        &self,
        name: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, ControlError> {
        if name == "query-commands" {
            let mut names: Vec<&str> = self.table.keys().map(String::as_str).collect();
            names.push("query-commands");
            names.sort_unstable();
            return Ok(names.iter().map(|n| json!({"name": n})).collect());
        }
        let Some(cmd) = self.table.get(name) else {
            return Err(ControlError::command_not_found(name));
        };
        if let Some(k) = arguments.keys().find(|k| !cmd.params.contains(&k.as_str())) {
            return Err(ControlError::generic(format!(
                "Parameter '{k}' is unexpected"
            )));
        }
        (cmd.handler)(&Arguments { map: arguments })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn built_ins_and_argument_checks() {
        let c = Commands::new(Jobs::new());
        assert_eq!(
            c.execute("qmp_capabilities", Map::new()).unwrap(),
            json!({})
        );
        let e = c
            .execute("qmp_capabilities", args(json!({"enable": ["oob"]})))
            .unwrap_err();
        assert!(e.desc.contains("'oob' not available"));
        assert_eq!(c.execute("query-jobs", Map::new()).unwrap(), json!([]));
        let names = c.execute("query-commands", Map::new()).unwrap();
        assert!(names
            .as_array()
            .unwrap()
            .contains(&json!({"name": "job-cancel"})));

        let e = c.execute("nope", Map::new()).unwrap_err();
        assert_eq!(e.class, crate::ErrorClass::CommandNotFound);
        let e = c.execute("job-cancel", Map::new()).unwrap_err();
        assert_eq!(e.desc, "Parameter 'id' is missing");
        let e = c.execute("job-cancel", args(json!({"id": 3}))).unwrap_err();
        assert_eq!(e.desc, "Invalid parameter type for 'id', expected: string");
        let e = c
            .execute("job-cancel", args(json!({"id": "x"})))
            .unwrap_err();
        assert_eq!(e.desc, "Job 'x' not found");
        let e = c
            .execute("job-cancel", args(json!({"id": "x", "force": true})))
            .unwrap_err();
        assert_eq!(e.desc, "Parameter 'force' is unexpected");
    }

    #[test]
    fn integers() {
        let a = Arguments {
            map: args(json!({"a": 5, "b": -1, "c": 1.5, "d": "7", "e": null})),
        };
        assert_eq!(a.u64("a").unwrap(), Some(5));
        for k in ["b", "c", "d"] {
            assert!(a.u64(k).is_err(), "{k}");
        }
        assert_eq!(a.u64("e").unwrap(), None);
        assert_eq!(a.u64("z").unwrap(), None);
    }
}
