//! The login server's database under abuse from outside the process: the server killed with
//! SIGKILL in the middle of sign-ups, and a database on a read-only file system. Accounts are
//! whole or absent, never half there, and a read-only database is refused up front.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{fails, ok, run, TestNetwork};
use koe_auth::api::ErrorCode;
use koe_auth::network_init::load_network_file;
use koe_auth::LoginClient;
use koe_types::{DeviceKey, Pii};

const SIGNUPS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_during_signups_leaves_every_account_whole_or_absent() {
    let network = TestNetwork::init();
    let mut server = network.serve();
    let client = LoginClient::new(load_network_file(&network.network_file()).unwrap())
        .with_timeout(Duration::from_secs(20));

    let signups: Vec<_> = (0..SIGNUPS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let name = format!("user{i:03}");
                let password = Pii::new(format!("password of {name}"));
                let result = client.signup(&name, &password).await;
                (name, password, result.is_ok())
            })
        })
        .collect();
    // Hashing takes tens of milliseconds per sign-up on two cores: kill part-way through.
    tokio::time::sleep(Duration::from_millis(250)).await;
    server.kill();
    let mut outcomes = Vec::new();
    for signup in signups {
        outcomes.push(signup.await.unwrap());
    }
    let confirmed = outcomes.iter().filter(|(_, _, ok)| *ok).count();
    assert!(
        confirmed < SIGNUPS,
        "the kill came too late to interrupt anything ({confirmed} of {SIGNUPS} done)"
    );

    let integrity: String = rusqlite::Connection::open(network.database())
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");

    let _restarted = network.serve();
    let device = DeviceKey::generate().public_key();
    let mut present = 0;
    for (name, password, confirmed) in &outcomes {
        match client.login(name, password, &device, None).await {
            Ok(certificate) => {
                assert_eq!(certificate.username().as_str(), name);
                present += 1;
            }
            Err(error) => {
                assert!(!confirmed, "{name} was confirmed to the client but is gone: {error}");
                assert_eq!(error.code(), Some(ErrorCode::UnknownUser), "{name}: {error}");
                // Absent means absent: the name can be signed up again.
                client.signup(name, password).await.unwrap();
            }
        }
    }
    assert!(present >= confirmed);
}

/// Runs `koe auth serve` with the database directory mounted read-only: under root, in a
/// private mount namespace (the mount vanishes with the process); otherwise with file modes.
fn serve_on_read_only_database(network: &TestNetwork) -> std::process::Output {
    let db_dir = network.database().parent().unwrap().to_path_buf();
    let serve = network.serve_command();
    let program = serve.get_program().to_owned();
    let args: Vec<_> = serve.get_args().map(|a| a.to_owned()).collect();
    if running_as_root() {
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount --bind \"$0\" \"$0\" && mount -o remount,ro,bind \"$0\" \"$0\" && shift && exec \"$@\"",
            )
            .arg(&db_dir)
            .arg("--")
            .arg(program)
            .args(args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped()).output().unwrap()
    } else {
        use std::os::unix::fs::PermissionsExt;
        let read_only = std::fs::Permissions::from_mode(0o444);
        std::fs::set_permissions(network.database(), read_only).unwrap();
        let mut command = Command::new(program);
        command.args(args).output().unwrap()
    }
}

fn running_as_root() -> bool {
    let output = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

#[test]
fn a_read_only_database_is_refused_at_start_and_left_intact() {
    let network = TestNetwork::init();
    {
        let _server = network.serve();
        let home = network.home("alice");
        let net = network.network_file();
        ok(run(&home, &["signup", "alice", "--network", net.to_str().unwrap(), "--password-stdin"], "correct horse\n"));
    }
    let before = std::fs::read(network.database()).unwrap();
    let output = serve_on_read_only_database(&network);
    let error = fails(output);
    assert!(error.contains("read-only"), "{error}");
    assert_eq!(std::fs::read(network.database()).unwrap(), before, "database unchanged");

    // Writable again: alice is still there.
    let _server = network.serve();
    let home = network.home("alice");
    ok(run(&home, &["login", "alice", "--password-stdin"], "correct horse\n"));
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_alone() {
    let network = TestNetwork::init();
    std::fs::write(network.database(), b"these are not the accounts you are looking for").unwrap();
    let before = std::fs::read(network.database()).unwrap();
    let mut command = network.serve_command();
    let error = fails(command.output().unwrap());
    assert!(error.contains("account database"), "{error}");
    assert_eq!(std::fs::read(network.database()).unwrap(), before);
}
