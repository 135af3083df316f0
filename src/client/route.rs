//! The task routes, `POST {base}/api/daemon/tasks/{id}/{action}`, and the
//! task ids they accept.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::error::Error;
pub(super) use crate::task_route::Action;
use crate::task_route::TASKS_PATH;

/// The longest task id accepted, in bytes.
const MAX_TASK_ID: usize = 1024;

// The client's side of the shared routes: where it sends each one.
impl Action {
    /// The path of this route for `task_id`, the id path-escaped.
    pub(super) fn path(self, task_id: &str) -> String {
        format!("{TASKS_PATH}{}/{}", escape_segment(task_id), self.as_str())
    }
}

/// Refuses a task id that is empty, holds a control character or is longer
/// than [`MAX_TASK_ID`]; the message quotes none of it.
pub(super) fn check_task_id(task_id: &str) -> Result<(), Error> {
    let reason = if task_id.is_empty() {
        "is empty"
    } else if task_id.len() > MAX_TASK_ID {
        "is longer than 1024 bytes"
    } else if task_id.chars().any(char::is_control) {
        "holds a control character"
    } else {
        return Ok(());
    };
    Err(Error::config(format!("the task id {reason}"), None))
}

/// Everything but the unreserved characters of RFC 3986.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'~')
    .remove(b'.');

/// [`SEGMENT`] and the dot: for the segments `.` and `..`, which a proxy
/// would otherwise resolve as "this" and "parent".
const DOTS: &AsciiSet = &SEGMENT.add(b'.');

/// Percent-encodes `segment` so an id is one path segment whatever it holds.
fn escape_segment(segment: &str) -> String {
    let dots_only = segment.bytes().all(|byte| byte == b'.');
    let set = if dots_only { DOTS } else { SEGMENT };
    utf8_percent_encode(segment, set).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_escaped_into_one_segment() {
        assert_eq!(escape_segment("t-1_a.b~"), "t-1_a.b~");
        assert_eq!(escape_segment("a/b c?d#%"), "a%2Fb%20c%3Fd%23%25");
        assert_eq!(escape_segment("é"), "%C3%A9");
        assert_eq!(escape_segment(".."), "%2E%2E");
        assert_eq!(escape_segment("."), "%2E");
        assert_eq!(escape_segment("v1.2"), "v1.2");
        assert_eq!(
            Action::Complete.path("../x"),
            "/api/daemon/tasks/..%2Fx/complete"
        );
    }
}
