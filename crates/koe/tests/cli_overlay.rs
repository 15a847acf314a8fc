//! The overlay as separate processes: `koe node` supernodes joined through the network file,
//! `koe up` clients, and the commands that talk to them — lookup, contacts, chat, history —
//! including a supernode killed under a client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{fails, ok, run, stdout, wait_until, KoeProcess, TestNetwork};

#[test]
fn users_on_different_supernodes_find_each_other_and_chat() {
    let network = TestNetwork::init();
    let _login = network.serve();
    let net = network.network_file();
    let mut supernodes = Vec::new();
    for i in 0..3 {
        let node = KoeProcess::node(&network.home(&format!("supernode{i}")), &net);
        ok(common::koe()
            .args(["network", "add-bootstrap", "--network"])
            .arg(&net)
            .arg(&node.first_line)
            .output()
            .unwrap());
        supernodes.push(node);
    }
    // Alice's and bob's copies of the network file list one supernode each (the first, the
    // last), so their parents differ; each learns the others from its parent.
    let copy_with_one_supernode = |name: &str, pick: fn(&[String]) -> Option<&String>| {
        let path = network.dir.path().join(name);
        let mut file = koe_types::NetworkFile::from_toml(&std::fs::read_to_string(&net).unwrap()).unwrap();
        file.bootstrap = pick(&file.bootstrap).into_iter().cloned().collect();
        std::fs::write(&path, file.to_toml()).unwrap();
        path
    };
    let alice_net = copy_with_one_supernode("alice-network.toml", |all| all.first());
    let bob_net = copy_with_one_supernode("bob-network.toml", |all| all.last());

    let (alice, bob) = (network.home("alice"), network.home("bob"));
    ok(run(&alice, &["signup", "alice", "--network", alice_net.to_str().unwrap(), "--password-stdin"], "correct horse\n"));
    ok(run(&bob, &["signup", "bob", "--network", bob_net.to_str().unwrap(), "--password-stdin"], "battery staple\n"));
    let _alice_up = KoeProcess::up(&alice);
    let _bob_up = KoeProcess::up(&bob);
    let parent = |home| {
        stdout(&run(home, &["status"], ""))
            .lines()
            .find(|l| l.starts_with("parent:"))
            .unwrap()
            .to_string()
    };
    assert_ne!(parent(&alice), parent(&bob), "different parents");

    let found = ok(run(&alice, &["lookup", "bob"], ""));
    assert!(found.contains("bob: 1 device(s) online"), "{found}");
    let carol = network.home("carol");
    ok(run(&carol, &["signup", "carol", "--network", net.to_str().unwrap(), "--password-stdin"], "carol's password
"));
    assert!(ok(run(&alice, &["lookup", "carol"], "")).contains("carol is offline"));
    assert!(fails(run(&alice, &["lookup", "nobody"], "")).contains("no such user: nobody"));
    assert!(fails(run(&alice, &["lookup", "Not A Name"], "")).contains("no such user"));

    assert!(ok(run(&alice, &["contacts", "add", "bob"], "")).contains("delivered to bob"));
    assert!(ok(run(&bob, &["contacts", "list"], "")).contains("wants to be your contact"));
    assert!(ok(run(&bob, &["contacts", "accept", "alice"], "")).contains("accepted"));
    wait_until(Duration::from_secs(5), || stdout(&run(&alice, &["contacts", "list"], "")).contains("online"));

    assert!(ok(run(&alice, &["chat", "bob", "hello", "bob"], "")).contains("delivered to bob"));
    let history = ok(run(&bob, &["messages", "alice"], ""));
    assert!(history.contains("alice → bob: hello bob"), "{history}");
    let sent = ok(run(&alice, &["messages"], ""));
    assert!(sent.contains("alice → bob: hello bob [delivered]"), "{sent}");

    let error = fails(run(&alice, &["chat", "carol", "hi"], ""));
    assert!(error.contains("not delivered to carol: carol is offline"), "{error}");
    assert!(ok(run(&alice, &["messages", "carol"], "")).contains("[undelivered]"));
    let error = fails(run(&alice, &["chat", "nobody", "hi"], ""));
    assert!(error.contains("no such user: nobody"), "{error}");
    // A contact request to nobody fails and adds nothing.
    assert!(fails(run(&alice, &["contacts", "add", "nobody"], "")).contains("no such user: nobody"));
    assert!(!ok(run(&alice, &["contacts", "list"], "")).contains("nobody"));

    // Away, then invisible: bob's lookup shows the status, then nothing.
    ok(run(&alice, &["set-status", "away"], ""));
    wait_until(Duration::from_secs(5), || stdout(&run(&bob, &["lookup", "alice"], "")).contains("away"));
    ok(run(&alice, &["set-status", "invisible"], ""));
    wait_until(Duration::from_secs(5), || stdout(&run(&bob, &["lookup", "alice"], "")).contains("alice is offline"));
    ok(run(&alice, &["set-status", "online"], ""));
    let error = fails(run(&alice, &["set-status", "busy"], ""));
    assert!(error.contains("invalid value 'busy'") && error.contains("online, away, dnd, invisible"), "{error}");

    // Garbage on the control socket gets an error and harms nothing.
    {
        use std::io::{Read, Write};
        let mut socket = std::os::unix::net::UnixStream::connect(alice.join("control.sock")).unwrap();
        socket.write_all(b"\x00\xffnot json at all\n").unwrap();
        let mut answer = String::new();
        socket.read_to_string(&mut answer).unwrap();
        assert!(answer.contains("malformed request"), "{answer}");
    }
    assert!(ok(run(&alice, &["lookup", "bob"], "")).contains("online"));

    // A second daemon for the same profile is refused.
    let second = common::koe().arg("--home").arg(&alice).arg("up").output().unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already running"));

    // Kill bob's parent: bob attaches elsewhere and alice reaches him again.
    let bob_parent = parent(&bob);
    let victim = supernodes.iter_mut().find(|s| bob_parent.contains(&s.first_line)).unwrap();
    victim.kill();
    let elapsed = wait_until(Duration::from_secs(10), || {
        run(&alice, &["chat", "bob", "are you still there?"], "").status.success()
    });
    eprintln!("bob reachable again {elapsed:?} after his supernode died");
    assert_ne!(parent(&bob), bob_parent);
}

/// The README's operator steps in the order people take them: start the supernodes, then add
/// each to the network file. Running supernodes watch the file and join, without restarts,
/// even when no client introduces them (each user's file names one supernode only).
#[test]
fn supernodes_started_before_add_bootstrap_form_one_overlay() {
    let network = TestNetwork::init();
    let _login = network.serve();
    let net = network.network_file();
    let pristine = std::fs::read_to_string(&net).unwrap();
    let first = KoeProcess::node(&network.home("supernode1"), &net);
    let second = KoeProcess::node_relaying_on(&network.home("supernode2"), &net, common::RELAY_IPS[1]);
    for node in [&first, &second] {
        ok(common::koe().args(["network", "add-bootstrap", "--network"]).arg(&net).arg(&node.first_line).output().unwrap());
    }
    let homes: Vec<_> = [("alice", &first), ("bob", &second)]
        .into_iter()
        .map(|(name, supernode)| {
            let own = network.dir.path().join(format!("{name}-network.toml"));
            std::fs::write(&own, &pristine).unwrap();
            ok(common::koe().args(["network", "add-bootstrap", "--network"]).arg(&own).arg(&supernode.first_line).output().unwrap());
            let home = network.home(name);
            ok(run(&home, &["signup", name, "--network", own.to_str().unwrap(), "--password-stdin"], "a good password\n"));
            home
        })
        .collect();
    let _alice_up = KoeProcess::up(&homes[0]);
    let _bob_up = KoeProcess::up(&homes[1]);
    let took = wait_until(Duration::from_secs(20), || stdout(&run(&homes[0], &["lookup", "bob"], "")).contains("1 device(s) online"));
    eprintln!("alice found bob {took:?} after both were up");
    assert!(ok(run(&homes[0], &["chat", "bob", "one overlay"], "")).contains("delivered to bob"));
}

#[test]
fn a_supernode_serves_prometheus_metrics() {
    use std::io::{Read, Write};
    let network = TestNetwork::init();
    let metrics_port = common::free_port();
    let mut child = common::koe()
        .arg("--home")
        .arg(network.home("supernode"))
        .args(["node", "--network"])
        .arg(network.network_file())
        .args(["--listen", &format!("127.0.0.1:{}", common::free_port())])
        .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut first).unwrap();
    assert!(first.contains("/p2p/"));
    let mut page = String::new();
    wait_until(Duration::from_secs(5), || {
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", metrics_port)) else { return false };
        let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        page.clear();
        stream.read_to_string(&mut page).is_ok() && page.contains("200 OK")
    });
    let _ = child.kill();
    let _ = child.wait();
    for metric in ["koe_supernode_attached_clients 0", "koe_supernode_presence_records", "koe_supernode_refused_total"] {
        assert!(page.contains(metric), "{metric} missing from:\n{page}");
    }
}

#[test]
fn commands_without_a_running_client_say_so() {
    let network = TestNetwork::init();
    let home = network.home("carol");
    let error = fails(run(&home, &["status"], ""));
    assert!(error.contains("not running") && error.contains("koe up"), "{error}");
    let error = fails(run(&home, &["up"], ""));
    assert!(error.contains("no network") || error.contains("not logged in"), "{error}");
}

#[test]
fn a_reachable_client_promotes_itself_to_supernode_unless_metered() {
    let network = TestNetwork::init();
    let _login = network.serve();
    let net = network.network_file();
    let seed = KoeProcess::node(&network.home("seed"), &net);
    ok(common::koe().args(["network", "add-bootstrap", "--network"]).arg(&net).arg(&seed.first_line).output().unwrap());

    let alice = network.home("alice");
    ok(run(&alice, &["signup", "alice", "--network", net.to_str().unwrap(), "--password-stdin"], "correct horse\n"));
    let port = common::free_port();
    let _alice_up = KoeProcess::up_with(
        &alice,
        &["--supernode", "auto", "--promote-after", "1s", "--node-listen", &format!("127.0.0.1:{port}")],
    );
    wait_until(Duration::from_secs(15), || stdout(&run(&alice, &["status"], "")).contains("serving:     as a supernode"));
    let status = stdout(&run(&alice, &["status"], ""));
    let own = status.lines().find(|l| l.starts_with("serving:")).unwrap().split_whitespace().last().unwrap().to_string();
    assert!(own.contains(&format!("/tcp/{port}/p2p/")), "{status}");

    // Bob joins through alice's supernode alone and finds her.
    let bob_net = network.dir.path().join("bob-network.toml");
    let mut file = koe_types::NetworkFile::from_toml(&std::fs::read_to_string(&net).unwrap()).unwrap();
    file.bootstrap = vec![own.clone()];
    std::fs::write(&bob_net, file.to_toml()).unwrap();
    let bob = network.home("bob");
    ok(run(&bob, &["signup", "bob", "--network", bob_net.to_str().unwrap(), "--password-stdin"], "battery staple\n"));
    let _bob_up = KoeProcess::up(&bob);
    assert!(stdout(&run(&bob, &["status"], "")).contains(&own), "bob's parent is alice's supernode");
    wait_until(Duration::from_secs(10), || stdout(&run(&bob, &["lookup", "alice"], "")).contains("1 device(s) online"));

    // A metered client never offers.
    let carol = network.home("carol");
    ok(run(&carol, &["signup", "carol", "--network", net.to_str().unwrap(), "--password-stdin"], "carol's password\n"));
    let _carol_up = KoeProcess::up_with(
        &carol,
        &["--supernode", "auto", "--metered", "--promote-after", "1s", "--node-listen", &format!("127.0.0.1:{}", common::free_port())],
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(!stdout(&run(&carol, &["status"], "")).contains("serving:"));
}
