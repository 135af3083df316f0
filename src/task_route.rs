//! The task routes, `POST {base}/api/daemon/tasks/{id}/{action}`: one
//! definition for the client, which sends them, and the test server, which
//! answers them, so that the two cannot drift apart.

/// Where the task routes start, below the base URL.
pub(crate) const TASKS_PATH: &str = "/api/daemon/tasks/";

/// The routes of a task, `POST /api/daemon/tasks/{id}/{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// `start`: the agent started on the task.
    Start,
    /// `progress`: `{summary, step, total}`.
    Progress,
    /// `usage`: `{usage: [...]}`.
    Usage,
    /// `session`: `{session_id?, work_dir?}`.
    Session,
    /// `complete`: `{output, ...}`; terminal.
    Complete,
    /// `fail`: `{error, ...}`; terminal.
    Fail,
}

impl Action {
    /// The last segment of the route, as each variant names it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Progress => "progress",
            Action::Usage => "usage",
            Action::Session => "session",
            Action::Complete => "complete",
            Action::Fail => "fail",
        }
    }
}
