//! The JSON bodies the client sends.

use bytes::Bytes;
use serde_json::{Map, Value};

/// The body of `complete`: `{output, branch_name?, session_id?, work_dir?}`.
///
/// An optional field left unset, or set to an empty string, is omitted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompleteTask {
    output: String,
    branch_name: String,
    session_id: String,
    work_dir: String,
}

impl CompleteTask {
    /// A completion carrying the agent's `output`.
    pub fn new(output: impl Into<String>) -> CompleteTask {
        CompleteTask {
            output: output.into(),
            ..CompleteTask::default()
        }
    }

    /// The branch the agent pushed its work to.
    pub fn branch_name(mut self, branch_name: impl Into<String>) -> CompleteTask {
        self.branch_name = branch_name.into();
        self
    }

    /// The agent's session, so the task can be resumed.
    pub fn session_id(mut self, session_id: impl Into<String>) -> CompleteTask {
        self.session_id = session_id.into();
        self
    }

    /// The directory the agent worked in.
    pub fn work_dir(mut self, work_dir: impl Into<String>) -> CompleteTask {
        self.work_dir = work_dir.into();
        self
    }

    pub(super) fn to_json(&self) -> Bytes {
        JsonObject::default()
            .text("output", &self.output)
            .optional_text("branch_name", &self.branch_name)
            .optional_text("session_id", &self.session_id)
            .optional_text("work_dir", &self.work_dir)
            .into_bytes()
    }

    /// A completion read back from the JSON [`to_json`](CompleteTask::to_json)
    /// wrote: how a stored report is known again after a restart.
    #[cfg(feature = "outbox")]
    pub(super) fn from_json(json: &[u8]) -> Option<CompleteTask> {
        let value: Value = serde_json::from_slice(json).ok()?;
        let text = |field: &str| match value.get(field) {
            Some(Value::String(text)) => Some(text.clone()),
            None => Some(String::new()),
            Some(_) => None,
        };
        Some(CompleteTask {
            output: value.get("output")?.as_str()?.to_owned(),
            branch_name: text("branch_name")?,
            session_id: text("session_id")?,
            work_dir: text("work_dir")?,
        })
    }

    /// The fail report sent when the server refuses this completion for good:
    /// same session and work dir, reason `agent_error`.
    pub(super) fn fallback(&self, error: impl Into<String>) -> FailTask {
        FailTask::new(error)
            .session_id(self.session_id.clone())
            .work_dir(self.work_dir.clone())
            .failure_reason("agent_error")
    }
}

/// The body of `fail`: `{error, session_id?, work_dir?, failure_reason?}`.
///
/// An optional field left unset, or set to an empty string, is omitted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailTask {
    error: String,
    session_id: String,
    work_dir: String,
    failure_reason: String,
}

impl FailTask {
    /// A failure described by `error`.
    pub fn new(error: impl Into<String>) -> FailTask {
        FailTask {
            error: error.into(),
            ..FailTask::default()
        }
    }

    /// The agent's session, so the task can be resumed.
    pub fn session_id(mut self, session_id: impl Into<String>) -> FailTask {
        self.session_id = session_id.into();
        self
    }

    /// The directory the agent worked in.
    pub fn work_dir(mut self, work_dir: impl Into<String>) -> FailTask {
        self.work_dir = work_dir.into();
        self
    }

    /// A machine-readable reason, such as `agent_error` or `timeout`.
    pub fn failure_reason(mut self, failure_reason: impl Into<String>) -> FailTask {
        self.failure_reason = failure_reason.into();
        self
    }

    pub(super) fn to_json(&self) -> Bytes {
        JsonObject::default()
            .text("error", &self.error)
            .optional_text("session_id", &self.session_id)
            .optional_text("work_dir", &self.work_dir)
            .optional_text("failure_reason", &self.failure_reason)
            .into_bytes()
    }
}

/// One entry of a usage report: the tokens a model used for the task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageEntry {
    /// Who served the model, such as `anthropic`.
    pub provider: String,
    /// The model's name.
    pub model: String,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens read from the provider's cache.
    pub cache_read_tokens: u64,
    /// Input tokens written to the provider's cache.
    pub cache_write_tokens: u64,
}

impl UsageEntry {
    fn to_value(&self) -> Value {
        JsonObject::default()
            .text("provider", &self.provider)
            .text("model", &self.model)
            .number("input_tokens", self.input_tokens)
            .number("output_tokens", self.output_tokens)
            .number("cache_read_tokens", self.cache_read_tokens)
            .number("cache_write_tokens", self.cache_write_tokens)
            .into_value()
    }
}

/// `{"usage": [...]}`.
pub(super) fn usage_json(usage: &[UsageEntry]) -> Bytes {
    let entries = usage.iter().map(UsageEntry::to_value).collect();
    JsonObject::default()
        .value("usage", Value::Array(entries))
        .into_bytes()
}

/// `{"summary", "step", "total"}`.
pub(super) fn progress_json(summary: &str, step: u32, total: u32) -> Bytes {
    JsonObject::default()
        .text("summary", summary)
        .number("step", step.into())
        .number("total", total.into())
        .into_bytes()
}

/// `{"session_id"?, "work_dir"?}`.
pub(super) fn session_json(session_id: &str, work_dir: &str) -> Bytes {
    JsonObject::default()
        .optional_text("session_id", session_id)
        .optional_text("work_dir", work_dir)
        .into_bytes()
}

/// `{}`.
pub(super) fn empty_json() -> Bytes {
    JsonObject::default().into_bytes()
}

/// A JSON object under construction. Every string goes in without NUL bytes:
/// the server stores them in text columns, which reject NUL with a 500 that
/// no retry can fix.
#[derive(Default)]
struct JsonObject(Map<String, Value>);

impl JsonObject {
    fn text(self, key: &str, text: &str) -> JsonObject {
        self.value(key, Value::String(without_nul(text)))
    }

    /// Omitted when `text` is empty (once cleaned), as the server treats absent
    /// and empty alike.
    fn optional_text(self, key: &str, text: &str) -> JsonObject {
        match without_nul(text) {
            cleaned if cleaned.is_empty() => self,
            cleaned => self.value(key, Value::String(cleaned)),
        }
    }

    fn number(self, key: &str, number: u64) -> JsonObject {
        self.value(key, number.into())
    }

    fn value(mut self, key: &str, value: Value) -> JsonObject {
        self.0.insert(key.to_owned(), value);
        self
    }

    fn into_value(self) -> Value {
        Value::Object(self.0)
    }

    fn into_bytes(self) -> Bytes {
        self.into_value().to_string().into()
    }
}

fn without_nul(text: &str) -> String {
    text.replace('\0', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: Bytes) -> Value {
        serde_json::from_slice(&bytes).expect("valid JSON")
    }

    #[test]
    fn optionals_are_omitted_when_unset_or_empty() {
        let body = parse(CompleteTask::new("done").branch_name("").to_json());
        assert_eq!(body, serde_json::json!({"output": "done"}));
    }

    #[test]
    fn nul_bytes_are_removed_from_every_string() {
        let body = parse(
            FailTask::new("bad\0 input")
                .session_id("s1\0")
                .failure_reason("agent\0_error")
                .to_json(),
        );
        assert_eq!(
            body,
            serde_json::json!({"error": "bad input", "session_id": "s1", "failure_reason": "agent_error"})
        );
    }

    #[test]
    fn an_optional_of_nul_bytes_only_is_omitted() {
        let body = parse(session_json("\0\0", "/w"));
        assert_eq!(body, serde_json::json!({"work_dir": "/w"}));
    }
}
