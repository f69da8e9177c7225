//! The wire: QMP's shapes for the greeting, requests and replies, one JSON value a line.

use crate::error::ControlError;
use serde_json::{json, Map, Value};

/// A request, checked for shape but not yet for its command.
#[derive(Debug)]
pub(crate) struct Request {
    pub execute: String,
    pub arguments: Map<String, Value>,
    /// Echoed in the reply, whatever JSON value it is.
    pub id: Option<Value>,
}

/// Why a line is no request, with the id to echo when it had one.
pub(crate) type Refusal = (Option<Value>, ControlError);

/// The greeting sent on connect.
pub(crate) fn greeting() -> Value {
    let number = |s: &str| s.parse::<u64>().unwrap_or(0);
    json!({"QMP": {
        "version": {
            "qemu": {
                "major": number(env!("CARGO_PKG_VERSION_MAJOR")),
                "minor": number(env!("CARGO_PKG_VERSION_MINOR")),
                "micro": number(env!("CARGO_PKG_VERSION_PATCH")),
            },
            "package": concat!("qed ", env!("CARGO_PKG_VERSION")),
        },
        "capabilities": [],
    }})
}

/// Parses one line as a request, with QEMU's wording for what is wrong with it.
pub(crate) fn parse(line: &[u8]) -> Result<Request, Refusal> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        (
            None,
            ControlError::generic(format!("JSON parse error, {e}")),
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err((
            None,
            ControlError::generic("QMP input must be a JSON object"),
        ));
    };
    let id = obj.remove("id");
    let refuse = |desc: String| Err((id.clone(), ControlError::generic(desc)));
    let execute = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return refuse("QMP input member 'execute' must be a string".into()),
        None => return refuse("QMP input lacks member 'execute'".into()),
    };
    let arguments = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return refuse("QMP input member 'arguments' must be an object".into()),
    };
    if let Some(k) = obj.keys().next() {
        return refuse(format!("QMP input member '{k}' is unexpected"));
    }
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

/// The reply line (without its newline) to a request.
pub(crate) fn reply(result: Result<Value, ControlError>, id: Option<Value>) -> String {
    let mut m = Map::new();
    match result {
        Ok(v) => m.insert("return".into(), v),
        Err(e) => m.insert("error".into(), error_json(&e)),
    };
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m).to_string()
}

pub(crate) fn error_json(e: &ControlError) -> Value {
    json!({"class": e.class.as_str(), "desc": e.desc})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(line: &str) -> (Option<Value>, String) {
        let (id, e) = parse(line.as_bytes()).unwrap_err();
        (id, e.desc)
    }

    #[test]
    fn requests_and_what_is_wrong_with_them() {
        let r = parse(br#"{"execute":"x","arguments":{"a":1},"id":[1]}"#).unwrap();
        assert_eq!((r.execute.as_str(), r.id), ("x", Some(json!([1]))));
        assert_eq!(r.arguments["a"], 1);
        assert!(refusal("{").1.starts_with("JSON parse error"));
        assert!(refusal("\u{1}").1.starts_with("JSON parse error"));
        assert_eq!(refusal("[]").1, "QMP input must be a JSON object");
        assert_eq!(
            refusal(r#"{"id":7}"#),
            (Some(json!(7)), "QMP input lacks member 'execute'".into())
        );
        assert!(refusal(r#"{"execute":1}"#).1.contains("must be a string"));
        assert!(refusal(r#"{"execute":"x","arguments":[]}"#)
            .1
            .contains("must be an object"));
        assert!(refusal(r#"{"execute":"x","foo":1}"#)
            .1
            .contains("'foo' is unexpected"));
        // Deep nesting is refused by the parser's recursion limit, not the stack.
        let deep = "[".repeat(60000);
        assert!(refusal(&deep).1.starts_with("JSON parse error"));
    }

    #[test]
    fn replies_echo_the_id() {
        assert_eq!(
            reply(Ok(json!({})), Some(json!("a"))),
            r#"{"id":"a","return":{}}"#
        );
        assert_eq!(
            reply(Err(ControlError::command_not_found("x")), None),
            r#"{"error":{"class":"CommandNotFound","desc":"The command x has not been found"}}"#
        );
    }
}
