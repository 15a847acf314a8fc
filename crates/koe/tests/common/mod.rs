//! Runs the real `koe` binary as separate processes: a network in a temporary directory, a
//! login server process on a free loopback port, and client commands with their own profiles.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod netns;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub fn koe() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_koe"));
    command.env_remove("KOE_LOG").env_remove("KOE_HOME");
    command
}

/// Runs `koe ARGS` with profile `home`, feeding `stdin`.
pub fn run(home: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = koe()
        .arg("--home")
        .arg(home)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn koe");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for koe")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// Asserts success and returns stdout.
pub fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "koe failed: {}\nstdout: {}",
        stderr(&output),
        stdout(&output)
    );
    stdout(&output)
}

/// Asserts failure and returns stderr.
pub fn fails(output: Output) -> String {
    assert!(
        !output.status.success(),
        "koe should have failed; stdout: {}",
        stdout(&output)
    );
    stderr(&output)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A network created by `koe network init` in a temporary directory.
pub struct TestNetwork {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl TestNetwork {
    pub fn init() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        ok(koe()
            .args(["network", "init", "--name", "koe-test", "--dir"])
            .arg(dir.path().join("net"))
            .args(["--auth-listen", &format!("127.0.0.1:{port}")])
            .output()
            .unwrap());
        Self { dir, port }
    }

    pub fn network_file(&self) -> PathBuf {
        self.dir.path().join("net/network.toml")
    }

    pub fn secret_dir(&self) -> PathBuf {
        self.dir.path().join("net/secret")
    }

    pub fn database(&self) -> PathBuf {
        self.dir.path().join("accounts.db")
    }

    pub fn home(&self, name: &str) -> PathBuf {
        self.dir.path().join("homes").join(name)
    }

    /// The `koe auth serve` command line for this network.
    pub fn serve_command(&self) -> Command {
        let mut command = koe();
        command
            .args(["auth", "serve", "--no-rate-limits", "--network"])
            .arg(self.network_file())
            .arg("--secret-dir")
            .arg(self.secret_dir())
            .arg("--db")
            .arg(format!("sqlite:{}", self.database().display()));
        command
    }

    pub fn serve(&self) -> LoginServerProcess {
        LoginServerProcess::spawn(self.serve_command())
    }
}

/// A `koe auth serve` child process, killed when dropped.
pub struct LoginServerProcess {
    pub child: Child,
    pub first_line: String,
}

impl LoginServerProcess {
    /// Spawns `command` and waits until it prints that it listens.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn koe auth serve");
        let mut first_line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut first_line)
            .expect("read the server's first line");
        assert!(
            first_line.contains("listening on"),
            "login server did not start: {first_line:?}"
        );
        Self { child, first_line }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LoginServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the test supernodes' relay nodes listen and relay from: other loopback addresses than
/// the clients' 127.0.0.1, so that a namespace's firewall can block the clients' UDP and still
/// let relay nodes exchange datagrams, as relays out on the internet would; one per supernode
/// of [`network_with`], as relay hosts have their own addresses.
pub const RELAY_IPS: [&str; 2] = ["127.0.0.2", "127.0.0.3"];
/// Both of [`RELAY_IPS`], for a firewall rule.
pub const RELAY_NET: &str = "127.0.0.2/31";

/// Whether a call's output or history names a path through one of the test relay nodes.
pub fn relayed_through_test_relay(text: &str) -> bool {
    RELAY_IPS.iter().any(|ip| text.contains(&format!("over relayed (relay {ip}:")))
}

/// A long-running `koe` child process (`node` or `up`), killed when dropped.
pub struct KoeProcess {
    pub child: Child,
    pub first_line: String,
}

impl KoeProcess {
    /// `koe node` on a free loopback port; waits for its address line. Its relay node listens
    /// on the first of [`RELAY_IPS`], so a firewall can tell relay traffic from the clients'.
    pub fn node(home: &Path, network_file: &Path) -> Self {
        Self::node_relaying_on(home, network_file, RELAY_IPS[0])
    }

    /// `koe node` whose relay node listens on `relay_ip`.
    pub fn node_relaying_on(home: &Path, network_file: &Path, relay_ip: &str) -> Self {
        Self::node_at(home, network_file, relay_ip, free_port())
    }

    /// `koe node` on this TCP port (a restarted node comes back where it was).
    pub fn node_at(home: &Path, network_file: &Path, relay_ip: &str, port: u16) -> Self {
        Self::spawn_node(home, network_file, relay_ip, port).0
    }

    /// [`KoeProcess::node`], and the line it prints after its address: its relay node's
    /// addresses and TLS certificate fingerprint.
    pub fn node_with_relay_line(home: &Path, network_file: &Path) -> (Self, String) {
        let (node, mut stdout) = Self::spawn_node(home, network_file, RELAY_IPS[0], free_port());
        let mut relay_line = String::new();
        stdout.read_line(&mut relay_line).expect("read the node's relay line");
        (node, relay_line.trim().to_string())
    }

    /// A `koe node` that has printed its address, and the rest of its stdout.
    fn spawn_node(home: &Path, network_file: &Path, relay_ip: &str, port: u16) -> (Self, BufReader<std::process::ChildStdout>) {
        let mut child = koe()
            .arg("--home")
            .arg(home)
            .args(["node", "--network"])
            .arg(network_file)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--relay-listen", &format!("{relay_ip}:0"), "--relay-tls-listen", &format!("{relay_ip}:0")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn koe node");
        let mut first_line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        stdout.read_line(&mut first_line).expect("read the node's address");
        assert!(first_line.contains("/p2p/"), "koe node printed {first_line:?}");
        (Self { child, first_line: first_line.trim().to_string() }, stdout)
    }

    /// `koe up` for the profile in `home`; waits until `koe status` shows a parent.
    pub fn up(home: &Path) -> Self {
        Self::up_with(home, &[])
    }

    /// `koe up EXTRA…`; waits until `koe status` shows a parent.
    pub fn up_with(home: &Path, extra: &[&str]) -> Self {
        Self::daemon(home, &[&["up"], extra].concat())
    }

    /// A client daemon (`koe up …`, `koe echo-bot …`), once its control socket answers.
    pub fn daemon(home: &Path, args: &[&str]) -> Self {
        let child = koe()
            .arg("--home")
            .arg(home)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn koe up");
        let process = Self { child, first_line: String::new() };
        wait_until(std::time::Duration::from_secs(15), || {
            let output = run(home, &["status"], "");
            output.status.success() && stdout(&output).contains("/p2p/")
        });
        process
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for KoeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `condition` every 50 ms until it holds; panics after `timeout`.
pub fn wait_until(timeout: std::time::Duration, mut condition: impl FnMut() -> bool) -> std::time::Duration {
    let started = std::time::Instant::now();
    while !condition() {
        assert!(started.elapsed() < timeout, "condition not met within {timeout:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    started.elapsed()
}

/// A network with a login server, two supernodes (the second joined through the first) and
/// these users signed up, each with a copy of the network file that names only one of the
/// supernodes, alternately: neighbours in `users` attach to different supernodes.
pub fn network_with(users: &[&str]) -> (TestNetwork, LoginServerProcess, [KoeProcess; 2], Vec<PathBuf>) {
    let network = TestNetwork::init();
    let login = network.serve();
    let net = network.network_file();
    let pristine = std::fs::read_to_string(&net).unwrap();
    let first = KoeProcess::node(&network.home("supernode1"), &net);
    ok(koe().args(["network", "add-bootstrap", "--network"]).arg(&net).arg(&first.first_line).output().unwrap());
    let second = KoeProcess::node_relaying_on(&network.home("supernode2"), &net, RELAY_IPS[1]);
    let homes = users
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let home = network.home(name);
            let own = network.dir.path().join(format!("{name}-network.toml"));
            std::fs::write(&own, &pristine).unwrap();
            let supernode = if i % 2 == 0 { &first } else { &second };
            ok(koe().args(["network", "add-bootstrap", "--network"]).arg(&own).arg(&supernode.first_line).output().unwrap());
            let own = own.to_str().unwrap();
            if *name == "echo123" {
                // A reserved name: the operator creates the account, the service logs in.
                let (secrets, db) = (network.secret_dir(), format!("sqlite:{}", network.database().display()));
                let add = ["auth", "add-service-account", name, "--password-stdin", "--secret-dir", secrets.to_str().unwrap(), "--db", &db];
                assert!(fails(run(&home, &["signup", name, "--network", own, "--password-stdin"], "a good password\n")).contains("reserved"));
                ok(run(&home, &add, "a good password\n"));
                assert!(fails(run(&home, &add, "another password\n")).contains("already"), "the name is taken now");
                ok(run(&home, &["login", name, "--network", own, "--password-stdin"], "a good password\n"));
            } else {
                ok(run(&home, &["signup", name, "--network", own, "--password-stdin"], "a good password\n"));
            }
            home
        })
        .collect();
    (network, login, [first, second], homes)
}

/// [`koe_voice::signal::speech_match`], saying why when the recording is too short.
pub fn speech_match(speech: &[f32], heard: &[f32]) -> f64 {
    koe_voice::signal::speech_match(speech, heard).unwrap_or_else(|| {
        eprintln!("too little of the speech in a recording of {} samples", heard.len());
        0.0
    })
}

/// `samples` as a 48 kHz WAV file `name` in `dir`, for `--play`.
pub fn write_speech(dir: &Path, name: &str, samples: &[f32]) -> PathBuf {
    let path = dir.join(name);
    koe_voice::wav::write_mono(&path, samples, koe_voice::SAMPLE_RATE).unwrap();
    path
}

/// Waits (up to 10 s) for a client to write a call's recording, and reads it.
pub fn recording_when_written(path: &Path) -> Vec<f32> {
    wait_until(std::time::Duration::from_secs(10), || path.exists());
    // The file appears before its writer is done with it.
    std::thread::sleep(std::time::Duration::from_millis(300));
    koe_voice::wav::read_mono_48k(path).unwrap()
}

/// alice and bob on two supernodes, bob answering every call by himself and recording it to
/// [`Self::bob_heard`], alice's client started with extra `koe up` arguments; both online.
pub struct AliceAndAnsweringBob {
    pub network: TestNetwork,
    pub alice: PathBuf,
    pub bob: PathBuf,
    pub bob_heard: PathBuf,
    _processes: (LoginServerProcess, [KoeProcess; 2], KoeProcess, KoeProcess),
}

pub fn alice_and_answering_bob(alice_up: &[&str]) -> AliceAndAnsweringBob {
    let (network, login, supernodes, homes) = network_with(&["alice", "bob"]);
    let (alice, bob) = (homes[0].clone(), homes[1].clone());
    let bob_heard = network.dir.path().join("bob-heard.wav");
    let bob_up = KoeProcess::up_with(&bob, &["--auto-answer", "--record", bob_heard.to_str().unwrap()]);
    let alice_up = KoeProcess::up_with(&alice, alice_up);
    wait_until(std::time::Duration::from_secs(10), || stdout(&run(&alice, &["lookup", "bob"], "")).contains("1 device(s) online"));
    AliceAndAnsweringBob { network, alice, bob, bob_heard, _processes: (login, supernodes, bob_up, alice_up) }
}
