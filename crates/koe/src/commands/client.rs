//! `koe up` and the commands that talk to it over the control socket.

use anyhow::{bail, Result};

use crate::cli::{ContactsCommand, SupernodeMode, UpArgs};
use crate::daemon::control::{ask_streaming, ControlRequest};
use crate::daemon::{self, parse_status, DaemonOptions, Promotion};
use crate::profile::Profile;

use super::node::{node_identity, start_supernode};
use super::shutdown_signal;

pub async fn up(profile: Profile, args: UpArgs) -> Result<()> {
    let status = parse_status(&args.status).map_err(anyhow::Error::msg)?;
    let mut preferred = Vec::new();
    let mut supernode = None;
    if args.supernode == SupernodeMode::Always {
        let network = profile.resolve_network(None)?;
        let (node, address, stun) = start_supernode(&network, node_identity(profile.home())?, args.node_listen, &[], None).await?;
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
    let auto_answer =
        args.auto_answer.then(|| daemon::calls::AutoAnswer { play: args.play.clone(), record: args.record.clone(), echo: None });
    let options = DaemonOptions { status, preferred_supernodes: preferred, promotion, auto_answer, relay_only: args.relay_only };
    let result = daemon::run(profile, options, shutdown_signal()).await;
    if let Some((stop, task)) = supernode {
        let _ = stop.send(());
        let _ = task.await;
    }
    result
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
    };
    daemon::run(profile, options, shutdown_signal()).await
}

/// Sends one request to the running daemon and prints its answer (and, for a call, each
/// line as it happens).
pub async fn control(profile: &Profile, request: ControlRequest) -> Result<()> {
    let response = ask_streaming(profile.home(), &request, |line| println!("{line}")).await?;
    let output = response.output.trim_end();
    if !response.ok {
        bail!("{output}")
    }
    if !output.is_empty() {
        println!("{output}");
    }
    Ok(())
}

pub fn contacts_request(command: ContactsCommand) -> ControlRequest {
    match command {
        ContactsCommand::Add { username } => ControlRequest::ContactsAdd { username },
        ContactsCommand::Accept { username } => ControlRequest::ContactsAccept { username },
        ContactsCommand::Decline { username } => ControlRequest::ContactsDecline { username },
        ContactsCommand::Remove { username } => ControlRequest::ContactsRemove { username },
        ContactsCommand::List => ControlRequest::ContactsList,
    }
}
