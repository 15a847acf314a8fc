//! One module per group of subcommands; each is a thin layer over the library crates.

mod account;
mod auth;
mod client;
mod demo;
mod network;
pub mod node;
mod render;
pub mod relay;

use std::io::BufRead;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use koe_types::Pii;

use crate::cli::{Cli, Command};
use crate::daemon::api::Request;
use crate::profile::Profile;

pub async fn run(cli: Cli) -> Result<()> {
    let home = cli.home;
    let profile = || Profile::locate(home.clone());
    match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Network(command) => network::run(command),
        Command::Auth(command) => auth::run(command).await,
        Command::Signup(args) => account::signup(&profile()?, args).await,
        Command::Login(args) => account::login(&profile()?, args).await,
        Command::Whoami(args) => account::whoami(&profile()?, args).await,
        Command::Logout => account::logout(&profile()?).await,
        Command::Passwd(args) => account::change_password(&profile()?, args).await,
        Command::DeleteAccount(args) => account::delete_account(&profile()?, args).await,
        Command::Node(args) => node::run(home, args, shutdown_signal()).await,
        Command::Relay(args) => relay::run(args, shutdown_signal()).await,
        Command::Up(args) => client::up(profile()?, args).await,
        Command::Down => client::down(&profile()?).await,
        Command::Autostart { state } => client::autostart(&profile()?, state == crate::cli::OnOff::On),
        Command::Status => client::control(&profile()?, Request::Status).await,
        Command::Events => client::events(&profile()?).await,
        Command::Lookup { username } => client::control(&profile()?, Request::Lookup { username }).await,
        Command::SetStatus { status } => client::control(&profile()?, Request::SetStatus { status }).await,
        Command::Contacts(command) => client::control(&profile()?, client::contacts_request(command)).await,
        Command::Chat { username, text } => client::control(&profile()?, Request::Chat { username, text: text.join(" ") }).await,
        Command::Messages { username, limit } => client::control(&profile()?, Request::Messages { username, limit }).await,
        Command::Call { username, play, record, duration, hang_up_when_played } => {
            let request = Request::Call {
                username,
                play: absolute(play)?,
                record: absolute(record)?,
                duration_ms: duration.map(|d| d.as_millis() as u64),
                hang_up_when_played,
            };
            client::control(&profile()?, request).await
        }
        Command::Hangup => client::control(&profile()?, Request::Hangup).await,
        Command::Block { username } => client::control(&profile()?, Request::Block { username }).await,
        Command::Unblock { username } => client::control(&profile()?, Request::Unblock { username }).await,
        Command::Blocked => client::control(&profile()?, Request::Blocked).await,
        Command::Answer { play, record } => {
            let request = Request::Answer { play: absolute(play)?, record: absolute(record)? };
            client::control(&profile()?, request).await
        }
        Command::Decline => client::control(&profile()?, Request::Decline).await,
        Command::Mute { state } => client::control(&profile()?, Request::Mute { on: state == crate::cli::OnOff::On }).await,
        Command::Calls { limit } => client::control(&profile()?, Request::Calls { limit }).await,
        Command::EchoBot { listen } => client::echo_bot(profile()?, listen).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "koe", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = interrupt => {},
                _ = terminate.recv() => {},
            }
        }
        Err(_) => {
            let _ = interrupt.await;
        }
    }
}

/// Reads secrets from a prompt on the terminal, or line by line from stdin.
pub struct PasswordSource {
    from_stdin: bool,
}

impl PasswordSource {
    pub fn new(from_stdin: bool) -> Self {
        Self { from_stdin }
    }

    pub fn read(&self, prompt: &str) -> Result<Pii<String>> {
        if self.from_stdin {
            let mut line = String::new();
            let read = std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("cannot read the password from stdin")?;
            if read == 0 {
                bail!("expected a password on stdin, found end of input");
            }
            let password = line.strip_suffix('\n').unwrap_or(&line);
            let password = password.strip_suffix('\r').unwrap_or(password);
            Ok(Pii::new(password.to_string()))
        } else {
            rpassword::prompt_password(prompt)
                .map(Pii::new)
                .context("cannot read the password from the terminal (use --password-stdin)")
        }
    }

    /// A new password: asked twice on a terminal so a typo does not lock the user out.
    pub fn read_new(&self, prompt: &str) -> Result<Pii<String>> {
        let password = self.read(prompt)?;
        if !self.from_stdin && self.read("Repeat it: ")?.expose() != password.expose() {
            bail!("the two passwords differ; nothing was changed");
        }
        Ok(password)
    }
}

/// A file named on the command line, made absolute for the daemon (which runs elsewhere).
fn absolute(path: Option<std::path::PathBuf>) -> std::io::Result<Option<String>> {
    path.map(|p| std::path::absolute(p).map(|p| p.display().to_string())).transpose()
}
