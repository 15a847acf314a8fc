//! `koe`: the one binary of a Koe network. Parses the command line, sets up logging, and hands
//! each subcommand to its module in `commands`. Everything it does lives in the library crates.

mod cli;
mod commands;
mod daemon;
mod duration;
mod gateway;
mod profile;
#[cfg(feature = "audio-device")]
mod sound;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// The log of a background client (`koe up`, `koe echo-bot`), in its profile.
pub const LOG_FILE: &str = "koe.log";
/// A log larger than this at start is moved to `koe.log.1` (replacing the one before).
const MAX_LOG_BYTES: u64 = 10 * 1024 * 1024;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // The demo narrates on stdout; its parts' logs would only interleave with the story.
    let quiet = matches!(cli.command, cli::Command::Demo(_));
    // The STUN/TURN protocol crates log every refused request (a client's first, unauthenticated
    // one is refused by design) as an error; the relay node reports what matters itself.
    // rsipstack logs whole SIP messages, trunk credentials (Authorization) included, at INFO
    // and below: never shown.
    let default_level = match cli.verbose {
        0 if quiet => "error,stun_proto=off,turn_server_proto=off,rsipstack=off",
        0 => "warn,koe=info,koe_auth=info,koe_pstn=info,stun_proto=off,turn_server_proto=off,rsipstack=warn",
        1 => "info,stun_proto=warn,turn_server_proto=warn,rsipstack=warn",
        _ => "debug,rsipstack=warn",
    };
    let filter = || EnvFilter::try_from_env("KOE_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    // The client runs in the background of the user's shell: it says on stderr only what the
    // user must know (daemon::notice), and logs to a file in its profile unless -v.
    let background_client = matches!(cli.command, cli::Command::Up(_) | cli::Command::EchoBot { .. });
    match background_client.then(|| open_log_file(cli.home.clone())).flatten().filter(|_| cli.verbose == 0) {
        Some(file) => tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::try_from_env("KOE_LOG").unwrap_or_else(|_| {
                EnvFilter::new("warn,koe=info,koe_auth=info,koe_overlay=info,koe_media=info,koe_call=info,stun_proto=off,turn_server_proto=off")
            }))
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .init(),
        None => tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).init(),
    }

    // One way out for the whole process: --proxy, else HTTPS_PROXY (NO_PROXY either way).
    let proxy = match &cli.proxy {
        Some(url) => koe_proxy::Proxy::parse(url).map(|proxy| {
            let no_proxy = std::env::var("NO_PROXY").or_else(|_| std::env::var("no_proxy")).unwrap_or_default();
            Some(proxy.with_no_proxy(&no_proxy))
        }),
        None => koe_proxy::Proxy::from_env(),
    };
    match proxy {
        Ok(proxy) => koe_proxy::set_global(proxy),
        Err(error) => {
            eprintln!("koe: {error}");
            return ExitCode::FAILURE;
        }
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("koe: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("koe: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Opens (appending) the log file of the profile in `home`, moving a large one aside first.
fn open_log_file(home: Option<std::path::PathBuf>) -> Option<std::fs::File> {
    let profile = profile::Profile::locate(home).ok()?;
    let path = profile.home().join(LOG_FILE);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
        let _ = std::fs::rename(&path, profile.home().join(format!("{LOG_FILE}.1")));
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path).ok()
}
