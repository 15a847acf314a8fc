//! Load generator for the login server: signs up `--users` accounts, then `--concurrency`
//! workers log in as random users for `--duration` seconds, each login a new TLS connection
//! as from a separate device. Prints one Markdown table row:
//! `| label | logins/s | p50 ms | p99 ms | errors |`.
//!
//! With `--hash-only` it instead prints how long one argon2id hash takes here (median of 20).
//!
//! Run by `bench/login.sh`, which starts the server with each store.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use koe_auth::network_init::load_network_file;
use koe_auth::LoginClient;
use koe_types::{DeviceKey, Pii};

struct Options {
    network: PathBuf,
    label: String,
    users: usize,
    concurrency: usize,
    duration: Duration,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        network: PathBuf::new(),
        label: "login server".into(),
        users: 50,
        concurrency: 8,
        duration: Duration::from_secs(20),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--network" => options.network = value.clone().into(),
            "--label" => options.label = value.clone(),
            "--users" => options.users = number()? as usize,
            "--concurrency" => options.concurrency = number()? as usize,
            "--duration" => options.duration = Duration::from_secs(number()?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if options.network.as_os_str().is_empty() {
        return Err("--network FILE is required".into());
    }
    Ok(options)
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

fn median_hash_millis() -> f64 {
    let password = Pii::new("a password of typical length".to_string());
    let mut times: Vec<Duration> = (0..20)
        .map(|_| {
            let began = Instant::now();
            koe_auth::password::hash_password(&password);
            began.elapsed()
        })
        .collect();
    times.sort();
    percentile(&times, 0.5)
}

#[tokio::main]
async fn main() -> Result<(), String> {
    if std::env::args().any(|arg| arg == "--hash-only") {
        println!("{:.1}", median_hash_millis());
        return Ok(());
    }
    let options = parse_options()?;
    let network = load_network_file(&options.network).map_err(|e| e.to_string())?;
    let client = LoginClient::new(network);
    let run_id = std::process::id();
    let users: Vec<(String, Pii<String>)> = (0..options.users)
        .map(|i| (format!("load{run_id}-{i}"), Pii::new(format!("password {i} of the load test"))))
        .collect();
    for (name, password) in &users {
        client.signup(name, password).await.map_err(|e| format!("sign-up {name}: {e}"))?;
    }

    let start = Instant::now();
    let workers: Vec<_> = (0..options.concurrency)
        .map(|worker| {
            let client = client.clone();
            let users = users.clone();
            let duration = options.duration;
            tokio::spawn(async move {
                let device = DeviceKey::generate().public_key();
                let mut latencies = Vec::new();
                let mut errors = 0usize;
                let mut next = worker;
                while start.elapsed() < duration {
                    let (name, password) = &users[next % users.len()];
                    next += 7;
                    let began = Instant::now();
                    match client.login(name, password, &device, None).await {
                        Ok(_) => latencies.push(began.elapsed()),
                        Err(error) => {
                            errors += 1;
                            eprintln!("login {name}: {error}");
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (mut worker_latencies, worker_errors) = worker.await.map_err(|e| e.to_string())?;
        latencies.append(&mut worker_latencies);
        errors += worker_errors;
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "| {} | {} | {:.1} | {:.0} | {:.0} | {} |",
        options.label,
        options.concurrency,
        latencies.len() as f64 / elapsed,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        errors
    );
    Ok(())
}
