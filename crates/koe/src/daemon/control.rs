//! The daemon's local control socket (`control.sock` in the profile, mode 0600 by the
//! profile directory's 0700): one JSON request line in, one JSON response line out. The
//! `koe status | lookup | chat | …` commands are its clients.

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlResponse {
    pub ok: bool,
    pub output: String,
}

impl ControlResponse {
    pub fn ok(output: impl Into<String>) -> Self {
        Self { ok: true, output: output.into() }
    }

    pub fn failed(output: impl Into<String>) -> Self {
        Self { ok: false, output: output.into() }
    }
}

/// Sends one request to the daemon of the profile in `home`.
pub async fn ask(home: &Path, request: &ControlRequest) -> Result<ControlResponse> {
    let path = home.join(CONTROL_SOCKET);
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!("koe is not running for this profile ({}): start it with `koe up`", home.display())
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(read).read_line(&mut answer).await?;
    if answer.is_empty() {
        bail!("the daemon closed the connection without answering");
    }
    Ok(serde_json::from_str(&answer)?)
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

