//! `koe up` (in the foreground or detached), `koe down`, `koe autostart`, and the commands
//! that talk to the running client over the control socket.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cli::{ContactsCommand, SupernodeMode, UpArgs};
use crate::daemon::api::{ApiError, Request, Response};
use crate::daemon::control::{ask, ask_streaming, ControlError};
use crate::daemon::{self, DaemonOptions, Promotion};
use crate::profile::Profile;

use super::node::{node_identity, report, start_supernode};
use super::shutdown_signal;

pub async fn up(profile: Profile, args: UpArgs) -> Result<()> {
    let status = args.status.presence();
    if args.detach {
        return detach(&profile);
    }
    let mut preferred = Vec::new();
    let mut supernode = None;
    if args.supernode == SupernodeMode::Always {
        let network = profile.resolve_network(None)?;
        let (node, address, stun) = start_supernode(&network, node_identity(profile.home())?, args.node_listen, &[], None, Some(profile.home())).await?;
        tracing::info!("serving as a supernode at {address}");
        preferred.push(address.to_string());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        supernode = Some((stop, tokio::spawn(stun.alongside(node.run(async {
            let _ = stopped.await;
        })))));
    }
    let promotion = match args.supernode {
        SupernodeMode::Auto if args.metered => {
            tracing::info!("metered connection: not offering to serve as a supernode");
            None
        }
        SupernodeMode::Auto => Some(Promotion { after: args.promote_after, listen: args.node_listen }),
        _ => None,
    };
    if let (true, Some(path)) = (args.auto_answer, &args.record) {
        daemon::calls::check_recording_path(path).map_err(anyhow::Error::msg)?;
    }
    let auto_answer =
        args.auto_answer.then(|| daemon::calls::AutoAnswer { play: args.play.clone(), record: args.record.clone(), echo: None });
    let options = DaemonOptions { status, preferred_supernodes: preferred, promotion, auto_answer, relay_only: args.relay_only, notices_on_stderr: true, gateway: None };
    let result = daemon::run(profile, options, shutdown_signal()).await;
    if let Some((stop, task)) = supernode {
        let _ = stop.send(());
        let _ = task.await;
    }
    result
}

/// `koe up --detach`: runs `koe up` (the same arguments without `--detach`) as a process of
/// its own, relays what it first says (online, or why not; or why it could not start) and
/// returns, leaving it running.
fn detach(profile: &Profile) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let arguments: Vec<std::ffi::OsString> = std::env::args_os().skip(1).filter(|a| a != "--detach").collect();
    let mut child = std::process::Command::new(std::env::current_exe().context("cannot find the koe program")?)
        .args(arguments)
        .env("KOE_HOME", profile.home())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        // Its own process group: Ctrl-C in this shell is not for it.
        .process_group(0)
        .spawn()
        .context("cannot start koe up in the background")?;
    let stderr = child.stderr.take().context("no stderr from koe up")?;
    let mut said = Vec::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let first_news = line.contains(" is online") || line.contains("cannot reach any supernode") || line.contains("goes online when you do");
        said.push(line);
        if first_news {
            for line in &said {
                eprintln!("{line}");
            }
            println!("koe runs in the background (pid {}); `koe down` stops it", child.id());
            return Ok(());
        }
    }
    // It ended before saying it is online: its error is what it said.
    let _ = child.wait();
    let said = said.join("\n");
    bail!("{}", said.strip_prefix("koe: ").unwrap_or(&said))
}

/// `koe down`: asks the running client to stop and waits until it has.
pub async fn down(profile: &Profile) -> Result<()> {
    if ask(profile.home(), &Request::Shutdown).await.is_err() {
        println!("koe is not running for this profile");
        return Ok(());
    }
    if stopped(profile.home(), DOWN_WAIT).await {
        println!("koe stopped");
        Ok(())
    } else {
        bail!("koe was asked to stop but is still running after {DOWN_WAIT:?}")
    }
}

/// How long `koe down` waits for the client to finish.
const DOWN_WAIT: Duration = Duration::from_secs(15);

/// Waits (up to `wait`) until the client of the profile in `home` no longer answers.
pub async fn stopped(home: &Path, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::UnixStream::connect(home.join(crate::daemon::control::CONTROL_SOCKET)).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// `koe autostart on|off`: installs (or removes) a systemd user unit that runs `koe up` for
/// this profile at login, and enables it where systemd's user manager is reachable.
pub fn autostart(profile: &Profile, on: bool) -> Result<()> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .context("neither XDG_CONFIG_HOME nor HOME is set: nowhere to install a systemd user unit")?;
    let directory = config.join("systemd/user");
    let name = unit_name(profile.home());
    let path = directory.join(&name);
    if on {
        let program = std::env::current_exe().context("cannot find the koe program")?;
        let unit = format!(
            "# Written by `koe autostart on`; `koe autostart off` removes it.\n\
             [Unit]\nDescription=Koe client for {home}\nWants=network-online.target\nAfter=network-online.target\n\n\
             [Service]\nExecStart={program} --home {home} up\nRestart=on-failure\nRestartSec=10\n\n\
             [Install]\nWantedBy=default.target\n",
            program = systemd_quote(&program),
            home = systemd_quote(profile.home()),
        );
        std::fs::create_dir_all(&directory).with_context(|| format!("cannot create {}", directory.display()))?;
        std::fs::write(&path, unit).with_context(|| format!("cannot write {}", path.display()))?;
        println!("Installed {}.", path.display());
        match systemctl(&["daemon-reload"]).and_then(|()| systemctl(&["enable", &name])) {
            Ok(()) => println!("Enabled: koe starts when you log in (now: systemctl --user start {name})."),
            Err(why) => println!("Not enabled yet: {why}. Where systemd runs your session: systemctl --user enable --now {name}"),
        }
    } else {
        if !path.exists() {
            println!("koe does not start at login for this profile (no {}).", path.display());
            return Ok(());
        }
        let _ = systemctl(&["disable", &name]);
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        let _ = systemctl(&["daemon-reload"]);
        println!("Removed {}: koe no longer starts at login.", path.display());
    }
    Ok(())
}

/// `koe.service` for the default profile directory (`…/koe`), `koe-NAME.service` for another.
fn unit_name(home: &Path) -> String {
    let base: String = home
        .file_name()
        .map(|n| n.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect())
        .unwrap_or_default();
    match base.as_str() {
        "koe" | "" => "koe.service".into(),
        base => format!("koe-{base}.service"),
    }
}

/// A path as one word of a systemd command line.
fn systemd_quote(path: &Path) -> String {
    let text = path.display().to_string().replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%");
    format!("\"{text}\"")
}

fn systemctl(arguments: &[&str]) -> Result<(), String> {
    let output = std::process::Command::new("systemctl")
        .arg("--user")
        .args(arguments)
        .output()
        .map_err(|e| format!("systemctl: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("systemctl --user {}: {}", arguments.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// `koe echo-bot`: a client daemon that answers every call with an echo test.
pub async fn echo_bot(profile: Profile, listen: std::time::Duration) -> Result<()> {
    let auto_answer = daemon::calls::AutoAnswer { play: None, record: None, echo: Some(listen) };
    tracing::info!("echo test: callers hear a tone, speak for {listen:?}, hear a tone and then themselves");
    let options = DaemonOptions {
        status: Some(koe_overlay::PresenceStatus::Online),
        preferred_supernodes: Vec::new(),
        promotion: None,
        auto_answer: Some(auto_answer),
        relay_only: false,
        notices_on_stderr: true,
        gateway: None,
    };
    daemon::run(profile, options, shutdown_signal()).await
}

/// Sends one request to the running daemon and prints its answer (and, for a call, each
/// line as it happens). History (`messages`, `calls`, `contacts list`) is read from the
/// profile's database when the client is not running.
pub async fn control(profile: &Profile, request: Request) -> Result<()> {
    let response = match ask_streaming(profile.home(), &request, |event| report(&super::render::event(&event))).await {
        // The history is on this device, whether the client runs or is signed in or not.
        Ok(Response::Failed(ApiError::NotLoggedIn)) | Err(ControlError::NotRunning { .. }) if history_request(&request) => {
            read_history(profile, &request)?
        }
        Ok(response) => response,
        Err(error) => return Err(error.into()),
    };
    let me = profile.certificate().ok().flatten().map(|c| c.username().to_string());
    match super::render::response(me.as_deref(), &response) {
        Ok(text) => {
            let text = text.trim_end();
            if !text.is_empty() {
                report(text);
            }
            Ok(())
        }
        Err(error) => bail!("{error}"),
    }
}

/// `koe events`: prints what happens as it happens, until Ctrl-C or the client stops.
pub async fn events(profile: &Profile) -> Result<()> {
    let stopped = ask_streaming(profile.home(), &Request::Events, |event| report(&super::render::event(&event))).await;
    match stopped {
        Err(ControlError::NoAnswer) => {
            report("koe stopped");
            Ok(())
        }
        Err(error) => Err(error.into()),
        Ok(response) => bail!("unexpected answer: {response:?}"),
    }
}

fn history_request(request: &Request) -> bool {
    matches!(request, Request::Messages { .. } | Request::Calls { .. } | Request::ContactsList)
}

/// Answers a history request from the profile's database, without the daemon.
fn read_history(profile: &Profile, request: &Request) -> Result<Response> {
    use crate::daemon::requests;
    let history = crate::daemon::history::History::open(&profile.home().join(crate::daemon::HISTORY_FILE))?;
    let answer = match request {
        Request::Messages { username, limit } => {
            username.as_deref().map(requests::user).transpose().and_then(|with| requests::messages(&history, with, *limit))
        }
        Request::Calls { limit } => requests::call_history(&history, *limit),
        _ => requests::contact_list(&history),
    };
    Ok(answer.unwrap_or_else(Response::Failed))
}

pub fn contacts_request(command: ContactsCommand) -> Request {
    match command {
        ContactsCommand::Add { username } => Request::ContactsAdd { username },
        ContactsCommand::Accept { username } => Request::ContactsAccept { username },
        ContactsCommand::Decline { username } => Request::ContactsDecline { username },
        ContactsCommand::Remove { username } => Request::ContactsRemove { username },
        ContactsCommand::List => Request::ContactsList,
    }
}
