//! The task server: a loopback stand-in for the real one, with faults.

use std::{
    collections::{HashMap, VecDeque},
    fmt, io,
    ops::Range,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{header::RETRY_AFTER, HeaderValue, Method, Response, StatusCode};
use http_body_util::Full;
use percent_encoding::percent_decode_str;
use serde_json::Value;
use tokio::time::Instant;

use super::{RecordedRequest, Reply, TestServer};
use crate::{
    sync::lock,
    task_route::{Action, TASKS_PATH},
};

// The server's side of the shared routes: it reads the action from a path.
impl Action {
    /// Every route, in the order of its declaration.
    const ALL: [Action; 6] = [
        Action::Start,
        Action::Progress,
        Action::Usage,
        Action::Session,
        Action::Complete,
        Action::Fail,
    ];
}

/// The field the body must hold, as a string, for the server to take it.
fn required_text(action: Action) -> Option<&'static str> {
    match action {
        Action::Progress => Some("summary"),
        Action::Complete => Some("output"),
        Action::Fail => Some("error"),
        Action::Start | Action::Usage | Action::Session => None,
    }
}

/// Where a task stands on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Added, not started.
    Queued,
    /// Started.
    Running,
    /// Completed: final.
    Completed,
    /// Failed: final.
    Failed,
}

impl TaskState {
    /// Whether the state is final (completed or failed).
    fn is_terminal(self) -> bool {
        matches!(self, TaskState::Completed | TaskState::Failed)
    }
}

/// Something going wrong between the client and the server, in place of the
/// server's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// This status (a 502, 503 or 504 from a proxy, say); the server never
    /// sees the request.
    Status(StatusCode),
    /// 429 with `Retry-After: <seconds>`; the server never sees the request.
    RateLimited {
        /// The delay the client is asked to wait, in seconds.
        retry_after_secs: u32,
    },
    /// The connection is closed before any response; the server never sees
    /// the request.
    Reset,
    /// The server handles the request (and commits it), then the connection is
    /// closed before the reply: the client cannot tell this from [`Fault::Reset`].
    ReplyLost,
    /// No answer, ever: the connection stays open until the server is dropped.
    Hang,
}

impl Fault {
    fn reply(&self) -> Reply {
        match self {
            Fault::Status(status) => Reply::status(status.as_u16()),
            Fault::RateLimited { retry_after_secs } => {
                let mut response = Response::new(Full::default());
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                let seconds = HeaderValue::from(*retry_after_secs);
                response.headers_mut().insert(RETRY_AFTER, seconds);
                Reply::Respond(response)
            }
            Fault::Reset | Fault::ReplyLost => Reply::Close,
            Fault::Hang => Reply::Hang,
        }
    }
}

/// A plain-text answer with this status.
fn text(status: StatusCode, body: &'static str) -> Reply {
    let mut response = Response::new(Full::from(body));
    *response.status_mut() = status;
    Reply::Respond(response)
}

/// What the server did with an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// A fault answered first: the server never saw the request.
    NotReached,
    /// Taken: the state changed (start, complete, fail) or the report was
    /// recorded (progress, usage, session).
    Applied,
    /// `complete` or `fail` on a task already completed or failed: 200,
    /// nothing changed.
    AlreadyTerminal,
    /// Refused with this status: 400 (bad body), 404 (unknown task), 405 (not
    /// a `POST`), 409 (`start` on a finished task).
    Rejected(StatusCode),
}

/// One request to a task route, as the server saw it, and what became of
/// it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Attempt {
    /// The task, its id decoded from the path.
    pub task_id: String,
    /// The route.
    pub action: Action,
    /// The request: its headers, its body, and when it arrived.
    pub request: RecordedRequest,
    /// The fault that stood in for the server, if any.
    pub fault: Option<Fault>,
    /// What the server did.
    pub handling: Handling,
    /// The status the client received: `None` when the connection was closed
    /// or hung.
    pub status: Option<StatusCode>,
}

/// The status the client receives, from the fault that stood in for the
/// server and what the server did: `None` when the connection is closed or
/// hangs.
fn status_received(fault: Option<Fault>, handling: Handling) -> Option<StatusCode> {
    match (fault, handling) {
        (Some(Fault::Status(status)), _) => Some(status),
        (Some(Fault::RateLimited { .. }), _) => Some(StatusCode::TOO_MANY_REQUESTS),
        (Some(Fault::Reset | Fault::ReplyLost | Fault::Hang), _) => None,
        (None, Handling::Rejected(status)) => Some(status),
        (None, Handling::NotReached | Handling::Applied | Handling::AlreadyTerminal) => {
            Some(StatusCode::OK)
        }
    }
}

#[derive(Debug)]
struct Outage {
    window: Range<Duration>,
    fault: Fault,
}

#[derive(Debug)]
struct State {
    started: Instant,
    /// How long every answer to a task route takes.
    latency: Duration,
    tasks: HashMap<String, TaskState>,
    scripts: HashMap<(String, Action), VecDeque<Fault>>,
    outages: Vec<Outage>,
    attempts: Vec<Attempt>,
}

/// A loopback task server that behaves like the real one, with scripted
/// faults: for testing a daemon's task callbacks, such as those of
/// `client::TaskClient` (feature `client`).
///
/// It serves `POST /api/daemon/tasks/{id}/{action}` for the
/// actions of [`Action`], on a [`TestServer`]:
///
/// - `complete` and `fail` are idempotent: on a task already completed or
///   failed they answer 200 `already terminal` and change nothing;
/// - an unknown task is 404 `task not found`, a bad body 400;
/// - a [`Fault`] can stand in for the server: a 502, 503 or 504, a 429 with
///   `Retry-After`, a connection reset before any response, a reply lost
///   *after* the state was committed, a hang. Faults are scripted per task
///   and action ([`script`](TaskServer::script)) or for every request in a window of
///   time ([`outage`](TaskServer::outage));
/// - it keeps each task's [state](TaskServer::state) and every
///   [attempt](TaskServer::attempts) it saw, with the request and what
///   became of it ([`Attempt`]): how often a task called a route, the report
///   that made it final, when each arrived.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use hyper_util::{client::legacy::Client, rt::TokioExecutor};
/// use tower_terminal_retry::test_server::{Action, Fault, Handling, TaskServer, TaskState};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let server = TaskServer::start().await?;
/// server.add_tasks(["t1"]);
/// // The first `complete` is committed, but its reply never arrives.
/// server.script("t1", Action::Complete, [Fault::ReplyLost]);
///
/// let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
/// let complete = || {
///     http::Request::post(server.url() + "/api/daemon/tasks/t1/complete")
///         .body(Full::from(r#"{"output":"done"}"#))
/// };
/// assert!(client.request(complete()?).await.is_err());
/// assert_eq!(server.state("t1"), Some(TaskState::Completed));
///
/// // The replay is harmless: "already terminal", 200.
/// assert_eq!(client.request(complete()?).await?.status(), 200);
/// let attempts = server.attempts();
/// assert_eq!(attempts[0].fault, Some(Fault::ReplyLost));
/// assert_eq!(attempts[1].handling, Handling::AlreadyTerminal);
/// // The report that made the task final.
/// assert_eq!(&attempts[0].request.body[..], br#"{"output":"done"}"#);
/// # Ok(())
/// # }
/// ```
pub struct TaskServer {
    server: TestServer,
    state: Arc<Mutex<State>>,
}

impl TaskServer {
    /// Starts a task server on 127.0.0.1 (a free port), with no task.
    ///
    /// # Errors
    ///
    /// When no loopback port can be bound.
    pub async fn start() -> io::Result<TaskServer> {
        let state = Arc::new(Mutex::new(State {
            started: Instant::now(),
            latency: Duration::ZERO,
            tasks: HashMap::new(),
            scripts: HashMap::new(),
            outages: Vec::new(),
            attempts: Vec::new(),
        }));
        let shared = state.clone();
        let server = TestServer::start(move |request| lock(&shared).answer(request)).await?;
        Ok(TaskServer { server, state })
    }

    /// `http://127.0.0.1:PORT`, the base URL for a client.
    pub fn url(&self) -> String {
        self.server.url("")
    }

    /// Adds queued tasks (those already there are left as they are).
    pub fn add_tasks(&self, task_ids: impl IntoIterator<Item = impl AsRef<str>>) {
        let mut state = lock(&self.state);
        for task_id in task_ids {
            let task_id = task_id.as_ref().to_owned();
            state.tasks.entry(task_id).or_insert(TaskState::Queued);
        }
    }

    /// Answers the next requests of `task_id` on `action` with `faults`, one
    /// each, in order (after any scripted before); later requests are handled.
    pub fn script(&self, task_id: &str, action: Action, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state)
            .scripts
            .entry((task_id.to_owned(), action))
            .or_default()
            .extend(faults);
    }

    /// Answers every request to a task route arriving between `from` and
    /// `until` after [`start`](TaskServer::start) (tokio's clock) with `fault`, unless a
    /// script has one for it. The first outage added wins where two overlap.
    pub fn outage(&self, from: Duration, until: Duration, fault: Fault) {
        lock(&self.state).outages.push(Outage {
            window: from..until,
            fault,
        });
    }

    /// Makes every answer to a task route (faults included) take `latency`:
    /// an attempt is then in flight from its arrival
    /// ([`request.at`](RecordedRequest::at)) for that long, or to the end for
    /// a hang. On tokio's paused clock, where the server's own work takes no
    /// time, that is exactly when its answer leaves.
    pub fn latency(&self, latency: Duration) {
        lock(&self.state).latency = latency;
    }

    /// A task's state, `None` for an unknown task.
    pub fn state(&self, task_id: &str) -> Option<TaskState> {
        lock(&self.state).tasks.get(task_id).copied()
    }

    /// Every attempt on a task route, in order of arrival.
    pub fn attempts(&self) -> Vec<Attempt> {
        lock(&self.state).attempts.clone()
    }
}

impl fmt::Debug for TaskServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("TaskServer")
            .field("addr", &self.server.addr())
            .field("tasks", &state.tasks.len())
            .field("attempts", &state.attempts.len())
            .finish_non_exhaustive()
    }
}

impl State {
    fn answer(&mut self, request: &RecordedRequest) -> Reply {
        let Some((task_id, action)) = route(request.uri.path()) else {
            return text(StatusCode::NOT_FOUND, "not found");
        };
        let fault = self.fault_for(&task_id, action, request.at);
        let (handling, reply) = match &fault {
            None => self.handle(&task_id, action, request),
            Some(lost @ Fault::ReplyLost) => {
                (self.handle(&task_id, action, request).0, lost.reply())
            }
            Some(fault) => (Handling::NotReached, fault.reply()),
        };
        self.attempts.push(Attempt {
            task_id,
            action,
            request: request.clone(),
            fault,
            handling,
            status: status_received(fault, handling),
        });
        match self.latency.is_zero() {
            true => reply,
            false => Reply::Delayed {
                after: self.latency,
                reply: Box::new(reply),
            },
        }
    }

    fn fault_for(&mut self, task_id: &str, action: Action, at: Instant) -> Option<Fault> {
        let key = (task_id.to_owned(), action);
        if let Some(fault) = self.scripts.get_mut(&key).and_then(VecDeque::pop_front) {
            return Some(fault);
        }
        let since_start = at.saturating_duration_since(self.started);
        self.outages
            .iter()
            .find(|outage| outage.window.contains(&since_start))
            .map(|outage| outage.fault)
    }

    /// The server's own logic: validate, apply, answer.
    fn handle(
        &mut self,
        task_id: &str,
        action: Action,
        request: &RecordedRequest,
    ) -> (Handling, Reply) {
        let rejected = |status: StatusCode, message: &'static str| {
            (Handling::Rejected(status), text(status, message))
        };
        if request.method != Method::POST {
            return rejected(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        let Some(task_state) = self.tasks.get_mut(task_id) else {
            return rejected(StatusCode::NOT_FOUND, "task not found");
        };
        if !valid_body(action, &request.body) {
            return rejected(StatusCode::BAD_REQUEST, "bad request body");
        }
        match action {
            Action::Complete | Action::Fail if task_state.is_terminal() => (
                Handling::AlreadyTerminal,
                text(StatusCode::OK, "already terminal"),
            ),
            Action::Complete | Action::Fail => {
                *task_state = match action {
                    Action::Complete => TaskState::Completed,
                    _ => TaskState::Failed,
                };
                (Handling::Applied, text(StatusCode::OK, "ok"))
            }
            Action::Start if task_state.is_terminal() => {
                rejected(StatusCode::CONFLICT, "task already terminal")
            }
            Action::Start => {
                *task_state = TaskState::Running;
                (Handling::Applied, text(StatusCode::OK, "ok"))
            }
            Action::Progress | Action::Usage | Action::Session => {
                (Handling::Applied, text(StatusCode::OK, "ok"))
            }
        }
    }
}

/// Whether `body` is a JSON object holding what `action` requires.
fn valid_body(action: Action, body: &[u8]) -> bool {
    let Ok(Value::Object(object)) = serde_json::from_slice(body) else {
        return false;
    };
    let text_present =
        required_text(action).is_none_or(|field| object.get(field).is_some_and(Value::is_string));
    text_present && (action != Action::Usage || object.get("usage").is_some_and(Value::is_array))
}

/// `/api/daemon/tasks/{id}/{action}` into the decoded id and the action.
fn route(path: &str) -> Option<(String, Action)> {
    let rest = path.strip_prefix(TASKS_PATH)?;
    let (escaped_id, action) = rest.rsplit_once('/')?;
    let action = Action::ALL
        .into_iter()
        .find(|candidate| candidate.as_str() == action)?;
    if escaped_id.contains('/') {
        return None;
    }
    Some((percent_decode(escaped_id)?, action))
}

/// Decodes `%XX` escapes; `None` for a broken escape or bytes that are not
/// UTF-8.
fn percent_decode(escaped: &str) -> Option<String> {
    // `percent_decode_str` passes a broken escape through as text; the server
    // refuses it instead.
    let well_formed = escaped.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    let decoded = percent_decode_str(escaped).decode_utf8().ok()?;
    Some(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_decode_the_id_and_name_the_action() {
        assert_eq!(
            route("/api/daemon/tasks/a%2Fb%20c/complete"),
            Some(("a/b c".to_owned(), Action::Complete))
        );
        assert_eq!(route("/api/daemon/tasks/t1/explode"), None);
        assert_eq!(route("/api/daemon/tasks/a/b/fail"), None);
        assert_eq!(route("/api/daemon/tasks/%zz/fail"), None);
        assert_eq!(route("/api/daemon/tasks/%2/fail"), None);
        assert_eq!(route("/other/t1/fail"), None);
    }

    #[test]
    fn bodies_must_hold_what_the_action_requires() {
        assert!(valid_body(Action::Complete, br#"{"output":"x"}"#));
        assert!(!valid_body(Action::Complete, br#"{"output":1}"#));
        assert!(!valid_body(Action::Fail, br#"{"output":"x"}"#));
        assert!(valid_body(Action::Usage, br#"{"usage":[]}"#));
        assert!(!valid_body(Action::Start, b"[]"));
        assert!(!valid_body(Action::Start, b"not json"));
    }
}
