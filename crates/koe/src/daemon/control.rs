//! The daemon's local control socket (`control.sock` in the profile, mode 0600 by the
//! profile directory's 0700): one JSON request line in, one JSON response line out — after
//! any number of progress lines for requests that take a while (a call prints ringing,
//! answered and live statistics as they happen). The `koe status | lookup | chat | call | …`
//! commands are its clients.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub const CONTROL_SOCKET: &str = "control.sock";
/// A request line longer than this is refused: chat texts are far shorter.
pub const MAX_CONTROL_LINE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum ControlRequest {
    Status,
    Lookup { username: String },
    SetStatus { status: String },
    Chat { username: String, text: String },
    Messages { username: Option<String>, limit: usize },
    ContactsAdd { username: String },
    ContactsRemove { username: String },
    ContactsAccept { username: String },
    ContactsDecline { username: String },
    ContactsList,
    /// Answered when the call ends, with everything that happened.
    Call { username: String, play: Option<String>, record: Option<String>, duration_ms: Option<u64> },
    Hangup,
    /// Answers the newest ringing call; answered when that call ends.
    Answer { play: Option<String>, record: Option<String> },
    Decline,
    /// Silences (or, with `on: false`, unsilences) the microphone of the call in progress.
    Mute { on: bool },
    /// The call history, newest last.
    Calls { limit: usize },
    /// Stops the daemon (`koe down`, `koe logout`): it withdraws its presence and exits.
    Shutdown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlResponse {
    pub ok: bool,
    pub output: String,
    /// A line of progress; the answer itself follows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub progress: bool,
}

impl ControlResponse {
    pub fn progress(line: impl Into<String>) -> Self {
        Self { ok: true, output: line.into(), progress: true }
    }

    pub fn ok(output: impl Into<String>) -> Self {
        Self { ok: true, output: output.into(), progress: false }
    }

    pub fn failed(output: impl Into<String>) -> Self {
        Self { ok: false, output: output.into(), progress: false }
    }
}

/// Sends one request to the daemon of the profile in `home`; progress lines come first in
/// the answer's output.
pub async fn ask(home: &Path, request: &ControlRequest) -> Result<ControlResponse> {
    let mut lines = String::new();
    let mut response = ask_streaming(home, request, |line| {
        lines.push_str(line);
        lines.push('\n');
    })
    .await?;
    lines.push_str(&response.output);
    response.output = lines;
    Ok(response)
}

/// Sends one request to the daemon of the profile in `home`, handing each progress line to
/// `on_progress` as it arrives.
pub async fn ask_streaming(home: &Path, request: &ControlRequest, mut on_progress: impl FnMut(&str)) -> Result<ControlResponse> {
    let path = home.join(CONTROL_SOCKET);
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!("koe is not running for this profile ({}): start it with `koe up`", home.display())
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut read = BufReader::new(read);
    loop {
        let mut answer = String::new();
        read.read_line(&mut answer).await?;
        if answer.is_empty() {
            bail!("the daemon closed the connection without answering");
        }
        let response: ControlResponse = serde_json::from_str(&answer)?;
        if !response.progress {
            return Ok(response);
        }
        on_progress(&response.output);
    }
}

/// Writes one response line.
pub async fn send_response(stream: &mut (impl tokio::io::AsyncWrite + Unpin), response: &ControlResponse) -> std::io::Result<()> {
    let mut line = serde_json::to_string(response).unwrap_or_default();
    line.push('\n');
    stream.write_all(line.as_bytes()).await
}

/// Reads one request line from a control connection, bounded.
pub async fn read_request(stream: &mut BufReader<UnixStream>) -> Result<ControlRequest, String> {
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

