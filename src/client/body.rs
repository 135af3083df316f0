//! The JSON bodies the client sends, as serde types.
//!
//! Every string goes out without NUL bytes: the server stores them in text
//! columns, which reject NUL with a 500 that no retry can fix. An optional
//! string that is empty (once cleaned) is omitted, as the server treats
//! absent and empty alike.

use bytes::Bytes;
use serde::{Deserialize, Serialize, Serializer};

use super::{
    report::{Completion, Failure, TaskResult},
    route::Action,
};

/// The body of `complete`: `{output, branch_name?, session_id?, work_dir?}`.
#[derive(Serialize)]
struct CompletionBody<'a> {
    #[serde(serialize_with = "without_nul")]
    output: &'a str,
    #[serde(serialize_with = "without_nul", skip_serializing_if = "is_blank")]
    branch_name: &'a str,
    #[serde(serialize_with = "without_nul", skip_serializing_if = "is_blank")]
    session_id: &'a str,
    #[serde(serialize_with = "without_nul", skip_serializing_if = "is_blank")]
    work_dir: &'a str,
}

/// The body of `fail`: `{error, session_id?, work_dir?, failure_reason?}`.
#[derive(Serialize)]
struct FailureBody<'a> {
    #[serde(serialize_with = "without_nul")]
    error: &'a str,
    #[serde(serialize_with = "without_nul", skip_serializing_if = "is_blank")]
    session_id: &'a str,
    #[serde(serialize_with = "without_nul", skip_serializing_if = "is_blank")]
    work_dir: &'a str,
    #[serde(serialize_with = "without_nul", skip_serializing_if = "is_blank")]
    failure_reason: &'a str,
}

/// A completion as the outbox stored it, read back to build the fallback
/// `fail` of a completion refused after a restart.
#[derive(Deserialize)]
struct StoredCompletion {
    output: String,
    #[serde(default)]
    branch_name: String,
    #[serde(default)]
    session_id: String,
    #[serde(default)]
    work_dir: String,
}

/// The route of `result` and its body.
pub(super) fn terminal(result: &TaskResult) -> (Action, Bytes) {
    match result {
        TaskResult::Completed(completion) => (Action::Complete, completed(completion)),
        TaskResult::Failed(failure) => (Action::Fail, failed(failure)),
    }
}

/// The body of `complete`.
fn completed(completion: &Completion) -> Bytes {
    json(&CompletionBody {
        output: &completion.output,
        branch_name: &completion.branch_name,
        session_id: &completion.session_id,
        work_dir: &completion.work_dir,
    })
}

/// The body of `fail`.
pub(super) fn failed(failure: &Failure) -> Bytes {
    json(&FailureBody {
        error: &failure.error,
        session_id: &failure.session_id,
        work_dir: &failure.work_dir,
        failure_reason: &failure.failure_reason,
    })
}

/// The completion a stored body of `complete` holds; `None` for one that is
/// not.
pub(super) fn stored_completion(body: &[u8]) -> Option<Completion> {
    let stored: StoredCompletion = serde_json::from_slice(body).ok()?;
    Some(Completion {
        output: stored.output,
        branch_name: stored.branch_name,
        session_id: stored.session_id,
        work_dir: stored.work_dir,
    })
}

/// One entry of a usage report: the tokens a model used for the task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageEntry {
    /// Who served the model, such as `anthropic`.
    #[serde(serialize_with = "without_nul")]
    pub provider: String,
    /// The model's name.
    #[serde(serialize_with = "without_nul")]
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

/// The body of `usage`: `{usage: [...]}`.
#[derive(Serialize)]
pub(super) struct Usage<'a> {
    pub(super) usage: &'a [UsageEntry],
}

/// The body of `progress`: `{summary, step, total}`.
#[derive(Serialize)]
pub(super) struct Progress<'a> {
    #[serde(serialize_with = "without_nul")]
    pub(super) summary: &'a str,
    pub(super) step: u32,
    pub(super) total: u32,
}

/// The body of `session`: `{session_id?, work_dir?}`.
#[derive(Serialize)]
pub(super) struct Session<'a> {
    #[serde(serialize_with = "without_nul", skip_serializing_if = "is_blank")]
    pub(super) session_id: &'a str,
    #[serde(serialize_with = "without_nul", skip_serializing_if = "is_blank")]
    pub(super) work_dir: &'a str,
}

impl Session<'_> {
    /// Whether it would send nothing: both fields blank.
    pub(super) fn is_empty(&self) -> bool {
        is_blank(self.session_id) && is_blank(self.work_dir)
    }
}

/// The body of `start`: `{}`.
pub(super) const EMPTY: Bytes = Bytes::from_static(b"{}");

/// `body` as JSON.
pub(super) fn json(body: &impl Serialize) -> Bytes {
    // Structs of strings and numbers always serialize.
    serde_json::to_vec(body)
        .expect("a body of strings and numbers serializes")
        .into()
}

fn without_nul<S: Serializer>(text: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&text.replace('\0', ""))
}

/// Empty once its NUL bytes are removed.
fn is_blank(text: &str) -> bool {
    text.bytes().all(|byte| byte == 0)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn parse(bytes: Bytes) -> Value {
        serde_json::from_slice(&bytes).expect("valid JSON")
    }

    #[test]
    fn optionals_are_omitted_when_unset_or_empty() {
        let (route, body) = terminal(&TaskResult::completed("done"));
        assert_eq!(route, Action::Complete);
        assert_eq!(parse(body), json!({"output": "done"}));
    }

    #[test]
    fn nul_bytes_are_removed_from_every_string() {
        let body = parse(failed(&Failure {
            error: "bad\0 input".into(),
            session_id: "s1\0".into(),
            failure_reason: "agent\0_error".into(),
            ..Failure::default()
        }));
        assert_eq!(
            body,
            json!({"error": "bad input", "session_id": "s1", "failure_reason": "agent_error"})
        );
    }

    #[test]
    fn an_optional_of_nul_bytes_only_is_omitted() {
        let session = Session {
            session_id: "\0\0",
            work_dir: "/w",
        };
        assert!(!session.is_empty());
        assert_eq!(parse(json(&session)), json!({"work_dir": "/w"}));
    }

    #[test]
    fn a_completion_reads_back_from_its_json() {
        let completion = Completion {
            output: "done".into(),
            session_id: "s1".into(),
            ..Completion::default()
        };
        let result = TaskResult::Completed(completion.clone());
        assert_eq!(stored_completion(&terminal(&result).1), Some(completion));
        assert_eq!(stored_completion(br#"{"output":1}"#), None);
    }
}
