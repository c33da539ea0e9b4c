//! Proves that stopping an app stops all of it: when one handler fails to leave its group, the
//! app still stops every other handler (each one's subscription is closed, committing what it
//! settled) and then reports the first failure, instead of returning at the first one and
//! leaving the rest running. The broker is the embedded Kafka one; only leaving the group is
//! made to fail, for one group, by a wrapper around the real subscriber.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use switchyard_broker::ConnectedBroker;
use switchyard_broker::{
    Broker, BrokerError, Delivery, Publisher, Subscriber, SubscriptionSpec, TopicSpec,
};
use switchyard_runtime::app::App;
use switchyard_runtime::manifest::ComponentConfig;
use switchyard_runtime::{Runtime, RuntimeError, RuntimeOptions};

/// The real broker, except that members of `failing_group` cannot leave it.
struct FailsToLeave {
    inner: Arc<dyn Broker>,
    failing_group: String,
    closed: Arc<std::sync::Mutex<Vec<String>>>,
}

struct Member {
    inner: Arc<dyn Subscriber>,
    group: String,
    fails: bool,
    closed: Arc<std::sync::Mutex<Vec<String>>>,
    left: AtomicBool,
}

#[async_trait]
impl Broker for FailsToLeave {
    fn describe(&self) -> String {
        format!(
            "{} (failing to leave {})",
            self.inner.describe(),
            self.failing_group
        )
    }

    fn messaging_system(&self) -> &'static str {
        self.inner.messaging_system()
    }

    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), BrokerError> {
        self.inner.ensure_topics(topics).await
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>, BrokerError> {
        self.inner.publisher().await
    }

    async fn subscribe(&self, spec: &SubscriptionSpec) -> Result<Arc<dyn Subscriber>, BrokerError> {
        Ok(Arc::new(Member {
            inner: self.inner.subscribe(spec).await?,
            group: spec.group.clone(),
            fails: spec.group == self.failing_group,
            closed: self.closed.clone(),
            left: AtomicBool::new(false),
        }))
    }
}

#[async_trait]
impl Subscriber for Member {
    async fn next(&self) -> Result<Delivery, BrokerError> {
        self.inner.next().await
    }

    async fn joined(&self) -> Result<(), BrokerError> {
        self.inner.joined().await
    }

    async fn close(&self) -> Result<(), BrokerError> {
        // The real member leaves either way, so the broker is not left with a ghost.
        self.inner.close().await?;
        if !self.left.swap(true, Ordering::SeqCst) {
            self.closed.lock().unwrap().push(self.group.clone());
        }
        if self.fails {
            return Err(BrokerError::unavailable(format!(
                "injected: {} could not leave its group",
                self.group
            )));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_fails_to_stop_does_not_keep_the_others_running() {
    let (cluster, real) = support::embedded().await;
    let topic = support::unique("stop");
    real.ensure_topics(&[TopicSpec {
        name: topic.clone(),
        partitions: 1,
    }])
    .await
    .unwrap();
    let (first, second) = (support::unique("first"), support::unique("second"));
    let closed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let broker: Arc<dyn Broker> = Arc::new(FailsToLeave {
        inner: real,
        failing_group: first.clone(),
        closed: closed.clone(),
    });
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    let mut handlers = Vec::new();
    for group in [&first, &second] {
        let config = ComponentConfig {
            subscribe: vec![topic.clone()],
            group: Some(group.clone()),
            ..ComponentConfig::new(support::component("consumer"))
        };
        let loaded = runtime.load(group, &config).unwrap();
        handlers.push(runtime.start_handler(&loaded).await.unwrap());
    }
    let app = App {
        broker: ConnectedBroker {
            broker,
            embedded: Some(cluster),
        },
        runtime: Arc::new(runtime),
        handlers,
        commands: Vec::new(),
        broker_config: switchyard_broker::BrokerConfig::default(),
        results_config: None,
        metrics: None,
        running: Default::default(),
        deployed_commands: tokio::task::JoinSet::new(),
    };

    let stopped = app.stop().await;
    assert!(
        matches!(&stopped, Err(RuntimeError::Broker(e)) if e.to_string().contains(&first)),
        "the first handler's failure is reported: {stopped:?}"
    );
    assert_eq!(
        *closed.lock().unwrap(),
        vec![first, second],
        "both handlers left their groups, the second after the first failed"
    );
}
