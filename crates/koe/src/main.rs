//! `koe`: the one binary of a Koe network. Parses the command line, sets up logging, and hands
//! each subcommand to its module in `commands`. Everything it does lives in the library crates.

mod cli;
mod commands;
mod daemon;
mod duration;
mod profile;
#[cfg(feature = "audio-device")]
mod sound;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // The demo narrates on stdout; its parts' logs would only interleave with the story.
    let quiet = matches!(cli.command, cli::Command::Demo(_));
    // The STUN/TURN protocol crates log every refused request (a client's first, unauthenticated
    // one is refused by design) as an error; the relay node reports what matters itself.
    let default_level = match cli.verbose {
        0 if quiet => "error,stun_proto=off,turn_server_proto=off",
        0 => "warn,koe=info,koe_auth=info,stun_proto=off,turn_server_proto=off",
        1 => "info,stun_proto=warn,turn_server_proto=warn",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("KOE_LOG").unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();

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
