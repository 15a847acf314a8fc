//! `koe demo`, the README's first command, runs a whole network and tells its story.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[test]
fn the_demo_runs_a_network_and_places_every_step() {
    let output = common::koe().arg("demo").output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed: {}\n{out}", String::from_utf8_lossy(&output.stderr));
    for expected in [
        "Started the login server",
        "Started 3 supernodes",
        "alice signed up and logged in",
        "checked bob's certificate offline",
        "is refused",
        "alice looked bob up in the global index",
        "bob: 1 device(s) online",
        "bob accepted alice's request",
        "alice sent bob a chat message: delivered to bob",
        "bob calls alice",
        "answered (device",
        "MOS (E-model estimate)",
        "ended: the file ended",
        "alice's client answered by itself and recorded",
        "carol is offline",
        "no such user: dave",
        "carol calls alice through a relay node",
        "over relayed (relay 127.0.0.1:",
        // SkypeOut: the phone built into the demo, a gateway, a voucher and a billed call.
        "Started a phone at sip:127.0.0.1:",
        "logged it in: certificate #",
        "carries the role \"gateway\"",
        "Started the PSTN gateway",
        "+81312345678: Japan fixed: ¥3.60/min (billed 60/60)",
        "your credit (¥0.00) is not enough for the first increment",
        "voucher redeemed: ¥100.00 added; your credit is now ¥100.00",
        "your credit (¥100.00) lasts 27 min",
        "calling +81312345678 through the gateway tokyo-gw",
        "The phone answered +81312345678 in PCMU",
        "heard bob press 1, #",
        "billed 1 min at ¥3.60/min: ¥3.60; your credit is now ¥96.40",
        "billed as 1 min at ¥3.60/min (increments 60/60): ¥3.60; ended: caller_hung_up",
        "credit: ¥96.40",
        "Removed the demo's files",
    ] {
        assert!(out.contains(expected), "the demo did not say {expected:?}:\n{out}");
    }
    assert!(output.stderr.is_empty(), "the demo's story is not interrupted by logs");
}
