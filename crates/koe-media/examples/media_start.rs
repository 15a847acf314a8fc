//! How soon media starts after the answer under loss: ICE and DTLS between two media sessions
//! in virtual time (`koe_media::virtual_call`), through a path that loses datagrams at random
//! or in bursts, many seeded calls per condition. Prints a Markdown table: median, 90th and
//! 99th percentile and worst time from the answer until both sides can send voice, the share of
//! calls over 1 s, and DTLS datagrams sent per call; then the same percentiles of its two parts,
//! ICE (until the caller's DTLS hello) and DTLS (the rest).
//!
//!   media_start [--calls 400] [--rtt-ms 40]

use std::time::Duration;

use koe_media::virtual_call::set_up;
use koe_voice::impairment::{Impairment, LossModel};

fn main() -> Result<(), String> {
    let (mut calls, mut rtt_ms) = (400u64, 40u64);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().and_then(|v| v.parse().ok()).ok_or(format!("{arg} needs a number"));
        match arg.as_str() {
            "--calls" => calls = value()?,
            "--rtt-ms" => rtt_ms = value()?,
            other => return Err(format!("unknown argument {other}; usage: media_start [--calls N] [--rtt-ms MS]")),
        }
    }
    let conditions = [
        ("clean", LossModel::None),
        ("random 5 %", LossModel::Random(0.05)),
        ("random 10 %", LossModel::Random(0.10)),
        ("random 20 %", LossModel::Random(0.20)),
        ("bursty 10 %, bursts of 3", LossModel::bursty(0.10, 3.0)),
        ("bursty 20 %, bursts of 3", LossModel::bursty(0.20, 3.0)),
    ];
    println!("Media start after the answer, {calls} calls per condition, round trip {rtt_ms} ms, loss both ways (virtual time)\n");
    println!("| condition | median | p90 | p99 | worst | over 1 s | never | DTLS datagrams per call |");
    println!("|---|---|---|---|---|---|---|---|");
    let ms = |d: Duration| format!("{} ms", d.as_millis());
    let mut parts = Vec::new();
    for (name, loss) in conditions {
        let path = Impairment { loss, delay: Duration::from_millis(rtt_ms / 2), ..Impairment::CLEAN };
        let (mut starts, mut never, mut dtls) = (Vec::new(), 0, 0);
        let (mut ice, mut handshake) = (Vec::new(), Vec::new());
        for call in 0..calls {
            let (caller, callee) = set_up(path, 1000 + 2 * call, Duration::from_millis(500), Duration::from_secs(10))?;
            dtls += caller.dtls_sent + callee.dtls_sent;
            match caller.connected_after.zip(callee.connected_after).filter(|_| caller.failure.is_none() && callee.failure.is_none()) {
                Some((a, b)) => {
                    let hello = caller.first_dtls_after.unwrap_or_default();
                    starts.push(a.max(b));
                    ice.push(hello);
                    handshake.push(a.max(b).saturating_sub(hello));
                }
                None => never += 1,
            }
        }
        starts.sort();
        let at = |q: f64| quantile(&starts, q);
        let over = starts.iter().filter(|&&s| s > Duration::from_secs(1)).count() + never;
        println!(
            "| {name} | {} | {} | {} | {} | {:.1} % | {never} | {:.1} |",
            ms(at(0.5)),
            ms(at(0.9)),
            ms(at(0.99)),
            ms(at(1.0)),
            100.0 * over as f64 / calls as f64,
            dtls as f64 / calls as f64
        );
        ice.sort();
        handshake.sort();
        parts.push(format!(
            "| {name} | {} / {} / {} | {} / {} / {} |",
            ms(quantile(&ice, 0.5)),
            ms(quantile(&ice, 0.9)),
            ms(quantile(&ice, 0.99)),
            ms(quantile(&handshake, 0.5)),
            ms(quantile(&handshake, 0.9)),
            ms(quantile(&handshake, 0.99)),
        ));
    }
    println!("\nThe two parts of the calls that connected, median / p90 / p99:\n");
    println!("| condition | ICE (answer → caller's DTLS hello) | DTLS (hello → both connected) |");
    println!("|---|---|---|");
    for line in parts {
        println!("{line}");
    }
    Ok(())
}

/// The `q` quantile (0–1) of sorted `values`.
fn quantile(values: &[Duration], q: f64) -> Duration {
    values.get(((values.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default()
}
