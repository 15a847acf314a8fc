//! `koe up` and the commands that talk to it over the control socket.

use anyhow::{bail, Result};

use crate::cli::{ContactsCommand, SupernodeMode, UpArgs};
use crate::daemon::control::{ask, ControlRequest};
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
        let (node, address) = start_supernode(&network, node_identity(profile.home())?, args.node_listen, &[]).await?;
        tracing::info!("serving as a supernode at {address}");
        preferred.push(address.to_string());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        supernode = Some((stop, tokio::spawn(node.run(async {
            let _ = stopped.await;
        }))));
    }
    let promotion = match args.supernode {
        SupernodeMode::Auto if args.metered => {
            tracing::info!("metered connection: not offering to serve as a supernode");
            None
        }
        SupernodeMode::Auto => Some(Promotion { after: args.promote_after, listen: args.node_listen }),
        _ => None,
    };
    let auto_answer = args.auto_answer.then(|| daemon::calls::AutoAnswer { play: args.play.clone(), record: args.record.clone() });
    let options = DaemonOptions { status, preferred_supernodes: preferred, promotion, auto_answer };
    let result = daemon::run(profile, options, shutdown_signal()).await;
    if let Some((stop, task)) = supernode {
        let _ = stop.send(());
        let _ = task.await;
    }
    result
}

/// Sends one request to the running daemon and prints its answer.
pub async fn control(profile: &Profile, request: ControlRequest) -> Result<()> {
    let response = ask(profile.home(), &request).await?;
    let output = response.output.trim_end();
    if response.ok {
        println!("{output}");
        Ok(())
    } else {
        bail!("{output}")
    }
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
