//! Reading what a server said when it refused a request.

use std::time::Duration;

use bytes::Buf;
use http_body_util::BodyExt;

/// How much of a response body an error keeps.
pub(crate) const MAX_ERROR_BODY: usize = 4 * 1024;

/// The first [`MAX_ERROR_BODY`] bytes of a body, as trimmed text; what could
/// be read within `timeout` if the server stalls. Reading it also lets the
/// connection go back to the pool.
pub(crate) async fn body_start<B: hyper::body::Body>(body: B, timeout: Duration) -> String {
    let mut body = std::pin::pin!(body);
    let mut start = Vec::new();
    let read = async {
        while start.len() < MAX_ERROR_BODY {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            start.extend_from_slice(chunk);
                            let read = chunk.len();
                            data.advance(read);
                        }
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
    };
    // A body cut short by the timeout or an error is still worth showing.
    let _ = tokio::time::timeout(timeout, read).await;
    start.truncate(MAX_ERROR_BODY);
    String::from_utf8_lossy(&start).trim().to_owned()
}
