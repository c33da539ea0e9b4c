//! `switchyard publish`, `switchyard consume` and `switchyard replay`: send and read messages
//! on any backend from the command line, the same way on Kafka and Pub/Sub (like `kcat -P` /
//! `kcat -C -J`), and send dead letters back to where they came from.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use serde_json::json;
use switchyard_broker::dead_letter;
use switchyard_broker::kafka::KafkaConfig;
use switchyard_broker::{BrokerConfig, IncomingMessage, OutgoingMessage, StartPosition};
use switchyard_client::{Client, ClientConfig, Isolation, Received, ValueSerializer};

/// The URL for clients of a `switchyard broker` at `servers`, with the client settings that
/// suit the embedded broker.
pub fn embedded_broker_url(servers: &str) -> String {
    BrokerConfig::Kafka(KafkaConfig::for_embedded(servers)).to_url()
}

/// The broker `switchyard broker` runs by default.
fn local_broker_url() -> String {
    embedded_broker_url("127.0.0.1:9092")
}

/// The broker a command line names (`--broker`, `$BROKER`), the local `switchyard broker` by
/// default; refuses `embedded`, which no other process can reach.
pub fn broker(url: Option<String>) -> anyhow::Result<BrokerConfig> {
    let url = url.unwrap_or_else(local_broker_url);
    let config = BrokerConfig::from_url(&url)?;
    if matches!(config, BrokerConfig::Embedded(_)) {
        bail!(
            "`embedded` lives inside one process, so other commands cannot share it: run \
             `switchyard broker` and use its URL (the default), or kafka:// / pubsub://"
        );
    }
    Ok(config)
}

/// What `switchyard publish` sends.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Broker URL (default: the local `switchyard broker`, or $BROKER).
    #[arg(long, env = "BROKER")]
    pub broker: Option<String>,
    /// Destination topic.
    #[arg(long, short)]
    pub topic: String,
    /// Key (Kafka) or ordering key (Pub/Sub).
    #[arg(long, short)]
    pub key: Option<String>,
    /// Header (Kafka) or attribute (Pub/Sub), as NAME=VALUE; repeatable.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Content type of the payload.
    #[arg(long)]
    pub content_type: Option<String>,
    /// Send this text as one message.
    #[arg(long)]
    pub payload: Option<String>,
    /// Send this file as one message.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

/// Publishes one message (`--payload`, `--file`) or one per line of standard input, and waits
/// until the broker stored every one.
pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let mut headers = Vec::new();
    for header in &args.headers {
        let Some((name, value)) = header.split_once('=') else {
            bail!("--header {header}: use NAME=VALUE");
        };
        headers.push((name.to_string(), value.to_string()));
    }
    let payloads: Vec<Vec<u8>> = match (&args.payload, &args.file) {
        (Some(_), Some(_)) => bail!("give --payload or --file, not both"),
        (Some(text), None) => vec![text.clone().into_bytes()],
        (None, Some(path)) => {
            vec![std::fs::read(path).with_context(|| format!("reading {}", path.display()))?]
        }
        (None, None) => std::io::stdin()
            .lock()
            .lines()
            .map(|line| line.map(String::into_bytes))
            .collect::<Result<_, _>>()
            .context("reading standard input")?,
    };
    let client = Client::connect(&ClientConfig {
        broker: broker(args.broker)?,
        topic: Some(args.topic.clone()),
        group: None,
        serializer: ValueSerializer::Bytes,
        start: StartPosition::Earliest,
        auto_ack: false,
        isolation_level: Isolation::default(),
    })
    .await?;
    let producer = client.producer().await?;
    producer.ensure_topic(&args.topic, 8).await?;
    let mut receipts = Vec::with_capacity(payloads.len());
    for payload in payloads {
        let message = OutgoingMessage {
            topic: args.topic.clone(),
            key: args.key.clone().map(String::into_bytes),
            payload,
            headers: headers.clone(),
            content_type: args.content_type.clone(),
        };
        receipts.push(producer.send_nowait(message).await?);
    }
    let count = receipts.len();
    for receipt in receipts {
        receipt.wait().await?;
    }
    eprintln!("published {count} message(s) to {}", args.topic);
    Ok(())
}

/// Where `switchyard consume` and `switchyard replay` read from.
#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    /// Broker URL (default: the local `switchyard broker`, or $BROKER).
    #[arg(long, env = "BROKER")]
    pub broker: Option<String>,
    /// Topic to read.
    #[arg(long, short)]
    pub topic: String,
    /// Consumer group (Kafka) or subscription (Pub/Sub), named after the topic unless given.
    /// A Pub/Sub subscription receives only what is published after it exists; the host
    /// creates one named after each dead-letter topic, so dead letters wait for this one.
    #[arg(long, short)]
    pub group: Option<String>,
    /// Where a new Kafka group starts: earliest or latest.
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    pub start: StartPosition,
    /// Stop after this many messages.
    #[arg(long, short)]
    pub count: Option<u64>,
    /// Stop when nothing arrived for this many seconds.
    #[arg(long, value_parser = parse_seconds)]
    pub idle_exit: Option<Duration>,
}

/// What `switchyard consume` reads.
#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    /// Where to read.
    #[command(flatten)]
    pub read: ReadArgs,
    /// Do not acknowledge: the messages are delivered again to the group.
    #[arg(long)]
    pub no_ack: bool,
}

/// What `switchyard replay` sends back.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Where to read the dead letters (`-t requests.dlq`).
    #[command(flatten)]
    pub read: ReadArgs,
    /// Send every message here instead of to the topic it was dead-lettered from.
    #[arg(long)]
    pub to: Option<String>,
}

/// `earliest` or `latest`, for `--start`.
fn parse_start(value: &str) -> Result<StartPosition, String> {
    match value {
        "earliest" => Ok(StartPosition::Earliest),
        "latest" => Ok(StartPosition::Latest),
        other => Err(format!("{other:?}: use earliest or latest")),
    }
}

fn parse_seconds(value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| format!("{value:?}: give a number of seconds, e.g. 2 or 0.5"))
}

/// Reads messages as `args` says and hands each to `each`, until the count, the idle time, an
/// error, or Ctrl-C / SIGTERM; then leaves the group, committing what `each` acknowledged.
/// Returns how many it read.
async fn read_each(
    args: &ReadArgs,
    client: &Client,
    mut each: impl AsyncFnMut(Received) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut signals = crate::signals::StopSignals::listen().context("listening for Ctrl-C")?;
    let consumer = client.consumer().await?;
    let mut read = 0u64;
    // A signal ends the loop between messages, never inside `each`: what was handed over is
    // finished and acknowledged, and the close below commits it.
    let stop = async {
        let signal = signals.next().await;
        tracing::info!("{signal}: stopping");
    };
    tokio::pin!(stop);
    let outcome: anyhow::Result<()> = async {
        while args.count.is_none_or(|count| read < count) {
            let next = async {
                match args.idle_exit {
                    Some(idle) => tokio::time::timeout(idle, consumer.next()).await.ok(),
                    None => Some(consumer.next().await),
                }
            };
            let next = tokio::select! {
                () = &mut stop => break,
                next = next => match next {
                    Some(next) => next,
                    // Idle for `--idle-exit`.
                    None => break,
                },
            };
            each(next?).await?;
            read += 1;
        }
        Ok(())
    }
    .await;
    let closed = consumer.close().await;
    outcome?;
    closed?;
    Ok(read)
}

async fn reader(args: &ReadArgs) -> anyhow::Result<Client> {
    let config = ClientConfig {
        broker: broker(args.broker.clone())?,
        topic: Some(args.topic.clone()),
        group: Some(args.group.clone().unwrap_or_else(|| args.topic.clone())),
        serializer: ValueSerializer::Bytes,
        start: args.start,
        auto_ack: false,
        // What aborted transactions wrote is never shown (an exactly-once handler's failed
        // attempts); the README says which brokers honour it.
        isolation_level: Isolation::ReadCommitted,
    };
    Ok(Client::connect(&config).await?)
}

/// Prints one JSON object per message on standard output and acknowledges it.
pub async fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let client = reader(&args.read).await?;
    let mut stdout = std::io::stdout().lock();
    let printed = read_each(&args.read, &client, async |received| {
        writeln!(stdout, "{}", json_line(received.message()))?;
        stdout.flush()?;
        if !args.no_ack {
            received.ack()?;
        }
        Ok(())
    })
    .await?;
    drop(stdout);
    eprintln!("consumed {printed} message(s) from {}", args.read.topic);
    Ok(())
}

/// One message as `switchyard consume` prints it.
fn json_line(message: &IncomingMessage) -> serde_json::Value {
    let mut line = json!({
        "topic": message.topic,
        "position": message.position,
        "key": message.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
        "headers": message
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), json!(value)))
            .collect::<serde_json::Map<_, _>>(),
        "content_type": message.content_type,
    });
    match std::str::from_utf8(&message.payload) {
        Ok(text) => line["payload"] = json!(text),
        Err(_) => {
            line["payload_base64"] =
                json!(base64::engine::general_purpose::STANDARD.encode(&message.payload))
        }
    }
    line
}

/// Sends each dead letter back to the topic it came from (or `--to`), as it was before it
/// failed, and acknowledges it only once the broker stored the copy: a replay stopped at any
/// point loses nothing (a message may be sent twice).
pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let client = reader(&args.read).await?;
    let producer = client.producer().await?;
    let mut sent_to = std::collections::BTreeMap::<String, u64>::new();
    let replayed = read_each(&args.read, &client, async |received| {
        let original = dead_letter::replay(received.message(), args.to.as_deref())?;
        let topic = original.topic.clone();
        producer
            .send(original)
            .await
            .with_context(|| format!("sending {} back to {topic}", received.message().position))?;
        received.ack()?;
        *sent_to.entry(topic).or_default() += 1;
        Ok(())
    })
    .await?;
    let destinations: Vec<String> = sent_to
        .iter()
        .map(|(topic, count)| format!("{count} to {topic}"))
        .collect();
    eprintln!(
        "replayed {replayed} message(s) from {}{}",
        args.read.topic,
        if destinations.is_empty() {
            String::new()
        } else {
            format!(": {}", destinations.join(", "))
        }
    );
    Ok(())
}
