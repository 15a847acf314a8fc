//! The daemon's local control socket (`control.sock` in the profile, mode 0600 by the
//! profile directory's 0700), which carries the typed API of [`super::api`]: one JSON
//! [`Request`] line in; any number of [`Frame::Event`] lines out (a call's lines as they
//! happen, or every event for `koe events`), then one [`Frame::Response`] line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::api::{Event, Request, Response};

pub const CONTROL_SOCKET: &str = "control.sock";
/// A request line longer than this is refused: chat texts are far shorter.
pub const MAX_CONTROL_LINE_BYTES: usize = 64 * 1024;

/// One line from the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frame {
    Event(Event),
    Response(Response),
}

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("koe is not running for this profile ({}): start it with `koe up`", .home.display())]
    NotRunning { home: PathBuf },
    #[error("the daemon closed the connection without answering")]
    NoAnswer,
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent something unreadable: {0}")]
    Garbled(#[from] serde_json::Error),
}

/// Sends one request to the daemon of the profile in `home`; events before the answer (a
/// call's lines) are dropped.
pub async fn ask(home: &Path, request: &Request) -> Result<Response, ControlError> {
    ask_streaming(home, request, |_| {}).await
}

/// Sends one request to the daemon of the profile in `home`, handing each event to `on_event`
/// as it arrives, until the answer. For [`Request::Events`] there is no answer: this returns
/// [`ControlError::NoAnswer`] when the daemon stops.
pub async fn ask_streaming(home: &Path, request: &Request, mut on_event: impl FnMut(Event)) -> Result<Response, ControlError> {
    let path = home.join(CONTROL_SOCKET);
    let stream = UnixStream::connect(&path).await.map_err(|_| ControlError::NotRunning { home: home.to_path_buf() })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut read = BufReader::new(read);
    loop {
        let mut answer = String::new();
        read.read_line(&mut answer).await?;
        if answer.is_empty() {
            return Err(ControlError::NoAnswer);
        }
        match serde_json::from_str(&answer)? {
            Frame::Event(event) => on_event(event),
            Frame::Response(response) => return Ok(response),
        }
    }
}

/// Writes one line.
pub async fn send_frame(stream: &mut (impl tokio::io::AsyncWrite + Unpin), frame: &Frame) -> std::io::Result<()> {
    let mut line = serde_json::to_string(frame).unwrap_or_default();
    line.push('\n');
    stream.write_all(line.as_bytes()).await
}

/// Reads one request line from a control connection, bounded.
pub async fn read_request(stream: &mut BufReader<UnixStream>) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut limited = (&mut *stream).take(MAX_CONTROL_LINE_BYTES as u64 + 1);
    limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if line.len() > MAX_CONTROL_LINE_BYTES {
        return Err(format!("request longer than {MAX_CONTROL_LINE_BYTES} bytes"));
    }
    serde_json::from_slice(&line).map_err(|e| format!("malformed request: {e}"))
}
