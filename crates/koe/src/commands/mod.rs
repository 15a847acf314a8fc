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
        Command::Relay(args) => relay::run(home, args, shutdown_signal()).await,
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
            let profile = profile()?;
            let username = dialled(&profile, &username)?;
            let request = Request::Call {
                username,
                play: absolute(play)?,
                record: absolute(record)?,
                duration_ms: duration.map(|d| d.as_millis() as u64),
                hang_up_when_played,
            };
            client::control(&profile, request).await
        }
        Command::Dtmf { digits } => client::control(&profile()?, Request::Dtmf { digits }).await,
        Command::Rate { number } => {
            let profile = profile()?;
            let number = dialled(&profile, &number)?;
            client::control(&profile, Request::Rate { number }).await
        }
        Command::Credit { action: None } => client::control(&profile()?, Request::Credit).await,
        Command::Credit { action: Some(crate::cli::CreditCommand::Redeem { code }) } => client::control(&profile()?, Request::Redeem { code }).await,
        Command::Config(command) => config(&profile()?, command),
        Command::Gateway(command) => crate::gateway::run(home, command, shutdown_signal()).await,
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

/// What `koe call` and `koe rate` were given: a username stays as it is; a phone number (it
/// starts with + or a digit) becomes E.164, national numbers by the configured home country.
/// Emergency and short numbers are refused here, before anything leaves the device.
fn dialled(profile: &Profile, target: &str) -> Result<String> {
    let looks_like_a_number = target.trim_start().starts_with(|c: char| c == '+' || c == '(' || c.is_ascii_digit());
    if !looks_like_a_number {
        return Ok(target.to_string());
    }
    let country = profile.home_country()?;
    let number = koe_pstn::number::parse_dialled(target, country.as_ref())?;
    Ok(number.to_string())
}

/// `koe config`.
fn config(profile: &Profile, command: crate::cli::ConfigCommand) -> Result<()> {
    use crate::cli::{ConfigCommand, ConfigKey};
    let mut config = profile.config()?;
    match command {
        ConfigCommand::Set { key: ConfigKey::Country, value } => {
            if value.eq_ignore_ascii_case("none") {
                config.country = None;
                println!("country unset: phone numbers must start with +");
            } else {
                let country = koe_pstn::number::HomeCountry::parse(&value)?;
                config.country = Some(country.alpha2().to_string());
                println!("country: {} ({}, +{}); national numbers like 0… are dialled from there", country.alpha2(), country.name(), country.calling_code());
            }
            profile.save_config(&config)
        }
        ConfigCommand::Get { key: ConfigKey::Country } => {
            println!("{}", config.country.as_deref().unwrap_or("none"));
            Ok(())
        }
        ConfigCommand::Show => {
            println!("country = {}", config.country.as_deref().unwrap_or("none"));
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
            Terminal.ask(prompt)
        }
    }

    /// A new password. From stdin (scripts) it is one line, checked by whoever takes it; on a
    /// terminal see [`ask_new_password`].
    pub fn read_new(&self, prompt: &str) -> Result<Pii<String>> {
        if self.from_stdin {
            self.read(prompt)
        } else {
            ask_new_password(&mut Terminal, prompt)
        }
    }
}

/// Someone answering prompts: the terminal, or a script in tests.
trait Prompter {
    /// Asks for a secret, which is not echoed.
    fn ask(&mut self, prompt: &str) -> Result<Pii<String>>;
    /// Tells the person something before the next prompt.
    fn tell(&mut self, line: &str);
}

/// The controlling terminal, as `rpassword` reaches it (even with stdin and stdout redirected).
struct Terminal;

impl Prompter for Terminal {
    fn ask(&mut self, prompt: &str) -> Result<Pii<String>> {
        rpassword::prompt_password(prompt)
            .map(Pii::new)
            .context("cannot read the password from the terminal (use --password-stdin)")
    }

    fn tell(&mut self, line: &str) {
        // stderr, not stdout: stdout carries the command's result, which scripts may read.
        eprintln!("{line}");
    }
}

/// Times a person may type a new password (twice each time) before the command gives up.
const NEW_PASSWORD_ATTEMPTS: usize = 3;

/// A new password typed by a person: the rules first, then the password twice so that a typo
/// does not lock them out. A mismatch, or a password the rules refuse, is asked again instead
/// of ending the command; after [`NEW_PASSWORD_ATTEMPTS`] it ends with what was wrong the last
/// time.
fn ask_new_password(prompter: &mut impl Prompter, prompt: &str) -> Result<Pii<String>> {
    prompter.tell(&koe_auth::password::password_rules());
    for attempt in 1..=NEW_PASSWORD_ATTEMPTS {
        let last = attempt == NEW_PASSWORD_ATTEMPTS;
        let password = prompter.ask(prompt)?;
        match koe_auth::password::check_new_password(&password) {
            Err(broken) if last => return Err(broken.into()),
            Err(broken) => {
                prompter.tell(&format!("That password cannot be used: {broken}. Try again."));
                continue;
            }
            Ok(()) => {}
        }
        if prompter.ask("Repeat it: ")?.expose() == password.expose() {
            return Ok(password);
        }
        if !last {
            prompter.tell("The two passwords differ. Try again.");
        }
    }
    bail!("the two passwords differ; nothing was changed")
}

/// A file named on the command line, made absolute for the daemon (which runs elsewhere).
fn absolute(path: Option<std::path::PathBuf>) -> std::io::Result<Option<String>> {
    path.map(|p| std::path::absolute(p).map(|p| p.display().to_string())).transpose()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::VecDeque;

    use koe_auth::password::{PASSWORD_MAX_BYTES, PASSWORD_MIN_CHARS};

    use super::*;

    /// A person at a terminal who types `answers` in turn; records what they were shown.
    struct Person {
        answers: VecDeque<&'static str>,
        saw: Vec<String>,
    }

    impl Person {
        fn typing(answers: &[&'static str]) -> Self {
            Self { answers: answers.iter().copied().collect(), saw: Vec::new() }
        }
    }

    impl Prompter for Person {
        fn ask(&mut self, prompt: &str) -> Result<Pii<String>> {
            self.saw.push(prompt.to_string());
            let answer = self.answers.pop_front().context("asked more often than the person answers")?;
            Ok(Pii::new(answer.to_string()))
        }

        fn tell(&mut self, line: &str) {
            self.saw.push(line.to_string());
        }
    }

    #[test]
    fn a_new_password_is_asked_after_the_rules_and_again_when_the_two_differ() {
        let mut person = Person::typing(&["correct horse", "correct hrose", "correct horse", "correct horse"]);
        let password = ask_new_password(&mut person, "New password for alice: ").unwrap();
        assert_eq!(password.expose(), "correct horse");
        let rules = &person.saw[0];
        assert!(rules.contains(&PASSWORD_MIN_CHARS.to_string()) && rules.contains(&PASSWORD_MAX_BYTES.to_string()), "{rules}");
        assert_eq!(person.saw[1], "New password for alice: ", "the rules come before the first prompt");
        assert!(person.saw.iter().any(|line| line.contains("differ. Try again")), "{:?}", person.saw);
        assert!(person.answers.is_empty());
    }

    #[test]
    fn a_password_the_rules_refuse_is_asked_again_without_repeating_it() {
        let mut person = Person::typing(&["short", "correct horse", "correct horse"]);
        assert_eq!(ask_new_password(&mut person, "New password: ").unwrap().expose(), "correct horse");
        assert!(person.saw.iter().any(|line| line.contains(&format!("at least {PASSWORD_MIN_CHARS} characters"))), "{:?}", person.saw);
        assert_eq!(person.saw.iter().filter(|line| *line == "Repeat it: ").count(), 1, "{:?}", person.saw);
    }

    #[test]
    fn three_mismatches_give_up_and_change_nothing() {
        let mut person = Person::typing(&["correct horse", "a", "correct horse", "b", "correct horse", "c", "never asked"]);
        let error = ask_new_password(&mut person, "New password: ").unwrap_err().to_string();
        assert_eq!(error, "the two passwords differ; nothing was changed");
        assert_eq!(person.answers, ["never asked"], "three tries, no more");
        // The last failure is the error, not also a "try again".
        assert_eq!(person.saw.iter().filter(|line| line.contains("Try again")).count(), 2, "{:?}", person.saw);
    }

    #[test]
    fn a_last_try_the_rules_refuse_ends_with_the_rule() {
        let mut person = Person::typing(&["correct horse", "x", "correct horse", "y", "short"]);
        let error = ask_new_password(&mut person, "New password: ").unwrap_err().to_string();
        assert!(error.contains(&format!("at least {PASSWORD_MIN_CHARS} characters")), "{error}");
    }
}
