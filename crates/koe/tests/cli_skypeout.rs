//! SkypeOut through real processes: a login server, two supernodes, a PSTN gateway (`koe
//! gateway serve`, logged in as a service account with the gateway role) with sipp as its
//! carrier, and alice's client. Alice asks the price, is refused without credit, redeems a
//! voucher, calls a phone number that echoes her speech back, is billed exactly, and sees her
//! credit; the operator exports the call record.
//!
//! Needs sipp (Debian's `sip-tester`); skips without it unless `KOE_REQUIRE_SIPP=1` (CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn sipp_available() -> bool {
    let found = Command::new("sipp").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found && std::env::var("KOE_REQUIRE_SIPP").as_deref() == Ok("1") {
        panic!("KOE_REQUIRE_SIPP=1 but sipp is not installed (apt install sip-tester)");
    }
    if !found {
        eprintln!("skipped: sipp is not installed (apt install sip-tester)");
    }
    found
}

/// sipp answering every call and echoing its audio, on a loopback address of its own.
struct Carrier {
    child: Child,
    ip: String,
}

impl Carrier {
    fn answering(calls: u32) -> Self {
        let ip = format!("127.{}.{}.{}", 100 + std::process::id() % 100, (std::process::id() / 100) % 250, 7);
        let scenario = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../koe-pstn/tests/sipp/answer.xml");
        let child = Command::new("sipp")
            .args(["-sf", scenario.to_str().unwrap(), "-i", &ip, "-p", "5060", "-mi", &ip, "-mp", "6000"])
            .args(["-m", &calls.to_string(), "-rtp_echo", "-nostdin", "-timeout", "300s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sipp starts");
        Self { child, ip }
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The operator's commands on the gateway's ledger.
fn operator(gateway: &Path, args: &[&str]) -> String {
    ok(run(gateway, &[&["gateway"], args].concat(), ""))
}

/// A gateway account created by the operator and logged in on `home`.
fn gateway_account(network: &TestNetwork, home: &Path, name: &str, network_file: &Path) {
    let (secrets, db) = (network.secret_dir(), format!("sqlite:{}", network.database().display()));
    let add = ["auth", "add-service-account", name, "--role", "gateway", "--password-stdin", "--secret-dir", secrets.to_str().unwrap(), "--db", &db];
    ok(run(home, &add, "the gateway's password\n"));
    ok(run(home, &["login", name, "--network", network_file.to_str().unwrap(), "--password-stdin"], "the gateway's password\n"));
}

#[test]
fn alice_calls_a_phone_number_with_voucher_credit_and_is_billed_exactly() {
    if !sipp_available() {
        return;
    }
    let (network, _login, supernodes, homes) = network_with(&["alice", "bob"]);
    let (alice, bob) = (&homes[0], &homes[1]);
    let carrier = Carrier::answering(1);
    let gateway = network.home("gateway");
    let gateway_network = network.dir.path().join("gateway-network.toml");
    std::fs::copy(network.network_file(), &gateway_network).unwrap();
    ok(koe().args(["network", "add-bootstrap", "--network"]).arg(&gateway_network).arg(&supernodes[1].first_line).output().unwrap());
    gateway_account(&network, &gateway, "tokyo-gw", &gateway_network);
    let trunk = format!("sip:{}:5060", carrier.ip);
    let rates = network.dir.path().join("rates.csv");
    std::fs::write(&rates, koe_pstn::rates::BUILT_IN_RATES).unwrap();
    let serve = ["gateway", "serve", "--trunk", &trunk, "--sip-listen", "127.0.0.1:0", "--rtp-timeout", "10s", "--block-prefix", "8190"];
    let gateway_up = KoeProcess::daemon(&gateway, &[&serve[..], &["--rates", rates.to_str().unwrap()]].concat());
    let _alice_up = KoeProcess::up(alice);
    let _bob_up = KoeProcess::up(bob);

    // Only an account with the gateway role may serve as one: users would not take its prices.
    let not_a_gateway = fails(run(bob, &["gateway", "serve", "--trunk", &trunk, "--sip-listen", "127.0.0.1:0"], ""));
    assert!(not_a_gateway.contains("bob is not a gateway account"), "{not_a_gateway}");

    // The price before dialling, found through the directory; no credit yet.
    let mut quote = String::new();
    wait_until(Duration::from_secs(20), || {
        let output = run(alice, &["rate", "+81 3-1234-5678"], "");
        quote = stdout(&output);
        output.status.success()
    });
    assert!(quote.contains("+81312345678: Japan fixed: ¥3.60/min (billed 60/60)"), "{quote}");
    assert!(quote.contains("your credit (¥0.00) is not enough for the first increment"), "{quote}");
    let refused = fails(run(alice, &["call", "+81312345678"], ""));
    assert!(refused.contains("not enough credit"), "{refused}");

    // A destination the operator blocked is refused before any price.
    let blocked = fails(run(alice, &["rate", "+819012345678"], ""));
    assert!(blocked.contains("the destination is blocked"), "{blocked}");

    // National format once alice says where she is; emergency numbers never leave the device.
    ok(run(alice, &["config", "set", "country", "jp"], ""));
    assert!(stdout(&run(alice, &["rate", "03-1234-5678"], "")).contains("+81312345678"));
    let emergency = fails(run(alice, &["call", "110"], ""));
    assert!(emergency.to_lowercase().contains("emergency"), "{emergency}");

    // Credit: a voucher (once only) and an operator's top-up.
    let vouchers = operator(&gateway, &["voucher", "create", "100", "--count", "1"]);
    let code = vouchers.lines().find(|line| line.starts_with("KOE-")).expect("a voucher code").to_string();
    let redeemed = ok(run(alice, &["credit", "redeem", &code.to_lowercase()], ""));
    assert!(redeemed.contains("¥100.00 added; your credit is now ¥100.00"), "{redeemed}");
    let again = fails(run(alice, &["credit", "redeem", &code], ""));
    assert!(again.contains("already used"), "{again}");
    let stolen = fails(run(bob, &["credit", "redeem", &code], ""));
    assert!(stolen.contains("already used"), "{stolen}");
    operator(&gateway, &["credit", "add", "alice", "50"]);

    // The call: priced again on its first line, answered by the phone, which echoes alice.
    let speech = koe_voice::signal::speechlike(3);
    let play = write_speech(network.dir.path(), "alice-says.wav", &speech);
    let heard = network.dir.path().join("alice-heard.wav");
    let call = ok(run(
        alice,
        &["call", "+81312345678", "--play", play.to_str().unwrap(), "--record", heard.to_str().unwrap(), "--hang-up-when-played"],
        "",
    ));
    let first = call.lines().next().unwrap_or_default();
    assert!(first.contains("Japan fixed: ¥3.60/min") && first.contains("lasts 41 min"), "{call}");
    assert!(call.contains("calling +81312345678 through the gateway tokyo-gw"), "{call}");
    assert!(call.contains("answered"), "{call}");
    assert!(call.contains("billed 1 min at ¥3.60/min: ¥3.60; your credit is now ¥146.40"), "{call}");
    let echoed = recording_when_written(&heard);
    let matched = speech_match(&speech, &echoed);
    assert!(matched > 0.5, "alice heard her own speech back through G.711 and the carrier's echo: match {matched:.2}");

    let credit = ok(run(alice, &["credit"], ""));
    assert!(credit.contains("credit: ¥146.40"), "{credit}");
    assert!(credit.contains("-¥3.60") && credit.contains("call to +81312345678 (Japan fixed)"), "{credit}");

    // Alice's own history names the number and the bill.
    let history = ok(run(alice, &["calls"], ""));
    assert!(history.contains("+81312345678") && history.contains("billed 1 min at ¥3.60/min: ¥3.60"), "{history}");

    // The operator's new prices take effect on SIGHUP, without a restart.
    std::fs::write(&rates, koe_pstn::rates::BUILT_IN_RATES.replace("81,Japan fixed,3.6,", "81,Japan fixed,4.2,")).unwrap();
    let hup = Command::new("kill").args(["-HUP", &gateway_up.child.id().to_string()]).status().unwrap();
    assert!(hup.success());
    wait_until(Duration::from_secs(10), || stdout(&run(alice, &["rate", "+81312345678"], "")).contains("¥4.20/min"));

    // The operator's record of it.
    let cdr = operator(&gateway, &["cdr", "--user", "alice"]);
    let row = cdr.lines().nth(1).expect("one call record");
    assert!(row.contains(",alice,+81312345678,Japan fixed,") && row.contains(",3.6,") && row.ends_with(",caller_hung_up"), "{cdr}");
}
