//! `switchyard broker` and `switchyard pubsub-emulator`: a broker for other processes, until
//! Ctrl-C.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use anyhow::Context;
use switchyard_broker::TopicSpec;
use switchyard_broker::kafka::EmbeddedKafka;
use switchyard_broker::pubsub::PubSubEmulator;

use super::messages;
use crate::signals::StopSignals;

#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on.
    #[arg(long, default_value_t = 9092)]
    pub port: u16,
    /// Topics to create, as NAME or NAME:PARTITIONS (others are created on first use with
    /// 4 partitions).
    #[arg(long = "topic", default_values_t = ["requests:8".to_string(), "predictions:8".to_string()])]
    pub topics: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct PubsubEmulatorArgs {
    /// Port to listen on (127.0.0.1).
    #[arg(long, default_value_t = 8085)]
    pub port: u16,
}

/// `switchyard pubsub-emulator`: Google's emulator on the port asked for, until Ctrl-C.
pub async fn pubsub_emulator(args: PubsubEmulatorArgs) -> anyhow::Result<ExitCode> {
    let port = args.port;
    let emulator = tokio::task::spawn_blocking(move || PubSubEmulator::start(Some(port))).await??;
    let mut signals = StopSignals::listen().context("listening for Ctrl-C")?;
    println!(
        "Pub/Sub emulator listening on {}; use PUBSUB_EMULATOR_HOST={} or --broker \
         'pubsub://PROJECT?endpoint={}&anonymous=true'. Ctrl-C stops it.",
        emulator.host(),
        emulator.host(),
        emulator.endpoint()
    );
    signals.next().await;
    drop(emulator);
    Ok(ExitCode::SUCCESS)
}

/// `switchyard broker`: the embedded broker alone, on a fixed address, until Ctrl-C.
pub async fn broker(args: BrokerArgs) -> anyhow::Result<ExitCode> {
    run_broker(SocketAddr::new(args.host, args.port), &args.topics).await
}

async fn run_broker(listen: SocketAddr, topics: &[String]) -> anyhow::Result<ExitCode> {
    let broker = EmbeddedKafka::start(Some(listen)).await?;
    for topic in topics {
        let (name, partitions) = match topic.split_once(':') {
            Some((name, partitions)) => (
                name,
                partitions
                    .parse()
                    .with_context(|| format!("--topic {topic}: partitions must be a number"))?,
            ),
            None => (topic.as_str(), 8),
        };
        switchyard_broker::check_topic_name(name)?;
        broker.create_topic(&TopicSpec {
            name: name.to_string(),
            partitions,
        })?;
    }
    let servers = broker.bootstrap_servers();
    let mut signals = StopSignals::listen().context("listening for Ctrl-C")?;
    println!(
        "embedded Kafka broker listening on {servers} (kcat -b {servers} -L); Ctrl-C stops it."
    );
    println!(
        "switchyard processes connect with --broker '{}'",
        messages::embedded_broker_url(servers)
    );
    signals.next().await;
    Ok(ExitCode::SUCCESS)
}
