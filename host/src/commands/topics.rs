//! `switchyard topics list|create|delete`: manage topics the same way on Kafka and Pub/Sub
//! (like `kafka-topics.sh` and `gcloud pubsub topics`), through the [`Broker`] trait, so what a
//! backend can and cannot do is said in one place: the backend.
//!
//! [`Broker`]: switchyard_broker::Broker

use anyhow::bail;
use switchyard_broker::ConnectedBroker;
use switchyard_broker::{BrokerError, TopicSpec};

use super::messages;

/// The broker a topics command talks to.
#[derive(Debug, clap::Args)]
pub struct BrokerArg {
    /// Broker URL (default: the local `switchyard broker`, or $BROKER).
    #[arg(long, env = "BROKER")]
    broker: Option<String>,
}

/// What `switchyard topics` does.
#[derive(Debug, clap::Subcommand)]
pub enum TopicsCommand {
    /// List the topics, one per line on standard output, sorted; on Kafka each is followed by
    /// a tab and its partition count. Kafka's internal topics (`__consumer_offsets`) are left
    /// out.
    #[command(after_help = "Example:\n  switchyard topics list --broker pubsub://my-project")]
    List {
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Create topics. One that exists already is an error unless --if-not-exists is given
    /// (it is then left as it is, partitions included).
    #[command(
        after_help = "Example:\n  switchyard topics create requests predictions --partitions 8 --broker kafka://127.0.0.1:9092"
    )]
    Create {
        #[command(flatten)]
        broker: BrokerArg,
        /// The topics.
        #[arg(required = true)]
        topics: Vec<String>,
        /// Partitions of each new topic (Kafka; Pub/Sub has none).
        #[arg(long, short, default_value_t = 8, value_parser = clap::value_parser!(i32).range(1..))]
        partitions: i32,
        /// Accept topics that exist already.
        #[arg(long)]
        if_not_exists: bool,
    },
    /// Delete topics and the messages they hold. One that does not exist is an error unless
    /// --if-exists is given. On Pub/Sub the topics' subscriptions are detached, not deleted
    /// (as `gcloud pubsub topics delete` does).
    #[command(
        after_help = "Example:\n  switchyard topics delete old-requests --broker pubsub://my-project"
    )]
    Delete {
        #[command(flatten)]
        broker: BrokerArg,
        /// The topics.
        #[arg(required = true)]
        topics: Vec<String>,
        /// Accept topics that do not exist.
        #[arg(long)]
        if_exists: bool,
    },
}

/// Runs one topics command. Every topic named is tried; the command fails, naming each topic
/// that failed, if any did.
pub async fn run(command: TopicsCommand) -> anyhow::Result<()> {
    match command {
        TopicsCommand::List { broker } => {
            let broker = connect(broker).await?;
            for topic in broker.broker.list_topics().await? {
                match topic.partitions {
                    Some(partitions) => println!("{}\t{partitions}", topic.name),
                    None => println!("{}", topic.name),
                }
            }
            Ok(())
        }
        TopicsCommand::Create {
            broker,
            topics,
            partitions,
            if_not_exists,
        } => {
            let broker = connect(broker).await?.broker;
            let change = Change {
                done: "created",
                unchanged: "exists already",
                accept_flag: "--if-not-exists",
                accept_unchanged: if_not_exists,
            };
            change
                .apply(topics, async |name| {
                    let spec = TopicSpec {
                        name: name.to_string(),
                        partitions,
                    };
                    broker.create_topic(&spec).await
                })
                .await
        }
        TopicsCommand::Delete {
            broker,
            topics,
            if_exists,
        } => {
            let broker = connect(broker).await?.broker;
            let change = Change {
                done: "deleted",
                unchanged: "does not exist",
                accept_flag: "--if-exists",
                accept_unchanged: if_exists,
            };
            change
                .apply(topics, async |name| broker.delete_topic(name).await)
                .await
        }
    }
}

/// How a change to topics is reported.
struct Change {
    /// What was done to a topic (`created`).
    done: &'static str,
    /// What a topic is when there was nothing to do (`exists already`).
    unchanged: &'static str,
    /// The flag that accepts that.
    accept_flag: &'static str,
    /// Whether it was given.
    accept_unchanged: bool,
}

impl Change {
    /// Applies `change` (which says whether it changed anything) to every topic, and fails
    /// naming each topic that failed, if any did.
    async fn apply(
        &self,
        topics: Vec<String>,
        change: impl AsyncFn(&str) -> Result<bool, BrokerError>,
    ) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        for name in topics {
            match change(&name).await {
                Ok(true) => eprintln!("{} topic {name}", self.done),
                Ok(false) if self.accept_unchanged => {
                    eprintln!("topic {name} {}", self.unchanged)
                }
                Ok(false) => failures.push(format!(
                    "topic {name} {} (pass {} to accept that)",
                    self.unchanged, self.accept_flag
                )),
                Err(e) => failures.push(format!("{:#}", anyhow::Error::new(e))),
            }
        }
        match failures.as_slice() {
            [] => Ok(()),
            [one] => bail!("{one}"),
            many => bail!("{} topics failed:\n  {}", many.len(), many.join("\n  ")),
        }
    }
}

async fn connect(broker: BrokerArg) -> anyhow::Result<ConnectedBroker> {
    let config = messages::broker(broker.broker)?;
    Ok(config.connect().await?)
}
