#[tokio::main]
async fn main() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let mut config = koe_relay::RelayConfig::new("127.0.0.1:3478".parse().unwrap());
    config.users = vec![("operator".into(), "hunter22".into())];
    config.policy.max_allocations_per_user = 0;
    config.policy.bytes_per_second_per_allocation = 0;
    let _relay = koe_relay::start_relay(config).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
}
