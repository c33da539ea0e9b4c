//! What a running host counts, for Prometheus: messages in and out per component and topic,
//! handler call latency, failures by kind, retries, dead letters, traps, and consumer lag where
//! the backend reports it (Kafka does, from librdkafka's statistics; Pub/Sub keeps its backlog
//! in Cloud Monitoring, which its client library does not read).
//!
//! Every runtime counts, whether or not anyone scrapes: the counters are atomics bumped beside
//! the handler's own [`HandlerStats`](crate::HandlerStats), which costs nanoseconds
//! against a handler call's tens of microseconds. [`MetricsServer`] serves them at
//! `GET /metrics` in Prometheus' text format when `--metrics ADDR` or the manifest's
//! `[metrics] listen` asks for it; it is off by default, because a port is something an
//! operator opens on purpose.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use switchyard_broker::PartitionLag;

/// Why the metrics could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be registered (two with one name: a bug, not an operator's error).
    #[error("cannot register the metrics: {0}")]
    Register(#[from] prometheus::Error),
    /// The address cannot be listened on.
    #[error(
        "cannot listen for /metrics on {address}: {source}; choose a free port \
         (`--metrics 127.0.0.1:0` takes any)"
    )]
    Listen {
        /// The address asked for.
        address: SocketAddr,
        /// What the system said.
        source: std::io::Error,
    },
}

/// Why a handler call did not succeed, as the `reason` label of
/// `switchyard_handler_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The handler returned a WIT error.
    Error,
    /// The instance trapped or hit a limit.
    Trap,
    /// A message the handler sent was not stored by the broker.
    Publish,
}

impl FailureKind {
    fn label(self) -> &'static str {
        match self {
            FailureKind::Error => "error",
            FailureKind::Trap => "trap",
            FailureKind::Publish => "publish",
        }
    }
}

/// Every metric of one host, in its own registry (so two runtimes in one process, as tests
/// have, never mix their counts).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    received: IntCounterVec,
    handled: IntCounterVec,
    sent: IntCounterVec,
    failures: IntCounterVec,
    retries: IntCounterVec,
    dead_lettered: IntCounterVec,
    dropped: IntCounterVec,
    traps: IntCounterVec,
    handler_seconds: HistogramVec,
    consumer_lag: IntGaugeVec,
}

/// Handler calls take from tens of microseconds (a small message) to seconds (a large batch
/// of inferences): 100 µs doubling to 3.3 s.
const HANDLER_SECONDS_BUCKETS: (f64, f64, usize) = (0.0001, 2.0, 16);

impl Metrics {
    /// Registers every metric, and the process' own (CPU, memory, open files) on Linux.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(counter.clone()))?;
            Ok::<_, prometheus::Error>(counter)
        };
        let (start, factor, count) = HANDLER_SECONDS_BUCKETS;
        let handler_seconds = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_handler_duration_seconds",
                "Time of one handler call, from handing it its messages to its return (a batch \
                 call handles several messages)",
            )
            .buckets(prometheus::exponential_buckets(start, factor, count)?),
            &["component"],
        )?;
        registry.register(Box::new(handler_seconds.clone()))?;
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "switchyard_consumer_lag",
                "Messages in a partition after the group's committed position (Kafka; updated \
                 every few seconds)",
            ),
            &["component", "topic", "partition"],
        )?;
        registry.register(Box::new(consumer_lag.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            received: counter(
                "switchyard_messages_received_total",
                "Messages a handler took from its subscription",
                &["component", "topic"],
            )?,
            handled: counter(
                "switchyard_messages_handled_total",
                "Messages handled successfully and acknowledged",
                &["component", "topic"],
            )?,
            sent: counter(
                "switchyard_messages_sent_total",
                "Messages components handed to the broker",
                &["component", "topic"],
            )?,
            failures: counter(
                "switchyard_handler_failures_total",
                "Attempts at a message that failed, by reason: error (the handler returned \
                 one), trap (the instance trapped or hit a limit), publish (a message it sent \
                 was refused)",
                &["component", "reason"],
            )?,
            retries: counter(
                "switchyard_retries_total",
                "Failed attempts that are tried again after a backoff",
                &["component"],
            )?,
            dead_lettered: counter(
                "switchyard_dead_letters_total",
                "Messages given up on and written to a dead-letter topic, by the topic they \
                 came from",
                &["component", "topic"],
            )?,
            dropped: counter(
                "switchyard_messages_dropped_total",
                "Messages given up on and dropped (dead letters are off)",
                &["component", "topic"],
            )?,
            traps: counter(
                "switchyard_traps_total",
                "Instances lost to a trap or a limit, and replaced",
                &["component"],
            )?,
            handler_seconds,
            consumer_lag,
            registry,
        })
    }

    /// The series of a component that handles messages from `topics`, all shown from the
    /// start (at zero), so rates and alerts work before the first message or failure.
    pub fn handler(self: &Arc<Self>, name: &str, topics: &[String]) -> ComponentMetrics {
        let metrics = self.component(name);
        let own = &metrics.own;
        own.retries
            .get_or_init(|| self.retries.with_label_values(&[name]));
        own.traps
            .get_or_init(|| self.traps.with_label_values(&[name]));
        own.handler_seconds
            .get_or_init(|| self.handler_seconds.with_label_values(&[name]));
        for topic in topics {
            self.received.with_label_values(&[name, topic]);
            self.handled.with_label_values(&[name, topic]);
        }
        metrics
    }

    /// The series of one component, each shown once first used (a command handles no
    /// messages, so it shows no handler series).
    pub fn component(self: &Arc<Self>, name: &str) -> ComponentMetrics {
        ComponentMetrics {
            name: name.into(),
            own: Arc::default(),
            lag_shown: Arc::default(),
            metrics: self.clone(),
        }
    }

    /// Everything, in Prometheus' text format.
    pub fn render(&self) -> Result<String, MetricsError> {
        Ok(TextEncoder::new().encode_to_string(&self.registry.gather())?)
    }
}

/// One component's metrics. The series without a topic are looked up once, on first use, so
/// a command (which handles no messages) shows no empty handler series.
#[derive(Debug, Clone)]
pub struct ComponentMetrics {
    name: Arc<str>,
    own: Arc<OwnSeries>,
    /// The (topic, partition) lag series it set last.
    lag_shown: Arc<std::sync::Mutex<Vec<(String, i32)>>>,
    metrics: Arc<Metrics>,
}

/// A component's series that carry no topic, each resolved when first bumped.
#[derive(Debug, Default)]
struct OwnSeries {
    retries: OnceLock<IntCounter>,
    traps: OnceLock<IntCounter>,
    handler_seconds: OnceLock<prometheus::Histogram>,
}

impl ComponentMetrics {
    fn by_topic(&self, vec: &IntCounterVec, topic: &str) {
        vec.with_label_values(&[&*self.name, topic]).inc();
    }

    /// A message taken from `topic`.
    pub fn received(&self, topic: &str) {
        self.by_topic(&self.metrics.received, topic);
    }

    /// A message from `topic` handled and acknowledged.
    pub fn handled(&self, topic: &str) {
        self.by_topic(&self.metrics.handled, topic);
    }

    /// The count of messages it sent to `topic`, to bump once the broker took one.
    pub fn sent_counter(&self, topic: &str) -> IntCounter {
        self.metrics.sent.with_label_values(&[&*self.name, topic])
    }

    /// A message from `topic` given up on: dead-lettered or, without dead letters, dropped.
    pub fn gave_up(&self, topic: &str, dead_lettered: bool) {
        let vec = match dead_lettered {
            true => &self.metrics.dead_lettered,
            false => &self.metrics.dropped,
        };
        self.by_topic(vec, topic);
    }

    /// An attempt that failed.
    pub fn failed(&self, kind: FailureKind) {
        self.metrics
            .failures
            .with_label_values(&[&*self.name, kind.label()])
            .inc();
    }

    /// A failed attempt to be tried again.
    pub fn retried(&self) {
        let labels = [&*self.name];
        let retries = self
            .own
            .retries
            .get_or_init(|| self.metrics.retries.with_label_values(&labels));
        retries.inc();
    }

    /// An instance lost to a trap.
    pub fn trapped(&self) {
        let labels = [&*self.name];
        let traps = self
            .own
            .traps
            .get_or_init(|| self.metrics.traps.with_label_values(&labels));
        traps.inc();
    }

    /// One handler call's time.
    pub fn call_took(&self, time: Duration) {
        let labels = [&*self.name];
        let histogram = self
            .own
            .handler_seconds
            .get_or_init(|| self.metrics.handler_seconds.with_label_values(&labels));
        histogram.observe(time.as_secs_f64());
    }

    /// Replaces the component's consumer lag series with `lag` (partitions it no longer has
    /// are removed, so a rebalance leaves no stale gauge behind).
    pub fn set_lag(&self, lag: &[PartitionLag]) {
        let gauges = &self.metrics.consumer_lag;
        let labels = |topic: &str, partition: i32| {
            [
                self.name.to_string(),
                topic.to_string(),
                partition.to_string(),
            ]
        };
        let mut shown = self.lag_shown.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, partition) in shown.iter() {
            if !lag
                .iter()
                .any(|p| p.topic == *topic && p.partition == *partition)
            {
                let _ = gauges.remove_label_values(&labels(topic, *partition));
            }
        }
        for partition in lag {
            gauges
                .with_label_values(&labels(&partition.topic, partition.partition))
                .set(partition.messages);
        }
        *shown = lag.iter().map(|p| (p.topic.clone(), p.partition)).collect();
    }

    /// Removes the component's consumer lag series (its subscription ended).
    pub fn clear_lag(&self) {
        self.set_lag(&[]);
    }
}

/// Serves `GET /metrics` until dropped.
#[derive(Debug)]
pub struct MetricsServer {
    asked_for: SocketAddr,
    address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Listens on `address` (port 0 takes a free one) and serves `metrics`.
    pub async fn start(address: SocketAddr, metrics: Arc<Metrics>) -> Result<Self, MetricsError> {
        let asked_for = address;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| MetricsError::Listen { address, source })?;
        let address = listener
            .local_addr()
            .map_err(|source| MetricsError::Listen { address, source })?;
        if !address.ip().is_loopback() {
            tracing::warn!(
                "/metrics listens on {address}, which other machines can reach; it tells what \
                 runs here (component and topic names), so keep it behind a firewall or use \
                 127.0.0.1"
            );
        }
        let task = tokio::spawn(serve(listener, metrics));
        Ok(Self {
            asked_for,
            address,
            task,
        })
    }

    /// The address it was asked to listen on (port 0, when it took a free one).
    pub fn asked_for(&self) -> SocketAddr {
        self.asked_for
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.address)
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a scrape may take to send its request; a client that says nothing is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: passes once connections close.
                tracing::warn!("/metrics: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let metrics = metrics.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&request, &metrics)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!("/metrics: connection from {peer}: {e}");
            }
        });
    }
}

fn answer<B>(request: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => match metrics.render() {
            Ok(text) => reply(StatusCode::OK, prometheus::TEXT_FORMAT, text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "switchyard serves its metrics at /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_series_follow_the_partitions_a_component_has() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let classifier = metrics.component("classifier");
        let consumer = metrics.component("consumer");
        let lag = |topic: &str, partition, messages| PartitionLag {
            topic: topic.into(),
            partition,
            messages,
        };
        classifier.set_lag(&[lag("requests", 0, 5), lag("requests", 1, 7)]);
        consumer.set_lag(&[lag("predictions", 0, 2)]);
        classifier.set_lag(&[lag("requests", 1, 3)]);
        let text = metrics.render().unwrap();
        assert!(
            text.contains(
                "switchyard_consumer_lag{component=\"classifier\",partition=\"1\",topic=\"requests\"} 3"
            ),
            "{text}"
        );
        assert!(
            !text.contains("partition=\"0\",topic=\"requests\""),
            "{text}"
        );
        assert!(
            text.contains(
                "switchyard_consumer_lag{component=\"consumer\",partition=\"0\",topic=\"predictions\"} 2"
            ),
            "{text}"
        );
        consumer.clear_lag();
        assert!(!metrics.render().unwrap().contains("predictions"));
    }

    #[test]
    fn handlers_show_their_series_from_the_start_and_commands_only_what_they_use() {
        let metrics = Arc::new(Metrics::new().unwrap());
        metrics.handler("classifier", &["requests".to_string()]);
        let producer = metrics.component("producer");
        producer.sent_counter("requests").inc();
        let text = metrics.render().unwrap();
        for series in [
            "switchyard_retries_total{component=\"classifier\"} 0",
            "switchyard_traps_total{component=\"classifier\"} 0",
            "switchyard_handler_duration_seconds_count{component=\"classifier\"} 0",
            "switchyard_messages_received_total{component=\"classifier\",topic=\"requests\"} 0",
            "switchyard_messages_handled_total{component=\"classifier\",topic=\"requests\"} 0",
            "switchyard_messages_sent_total{component=\"producer\",topic=\"requests\"} 1",
        ] {
            assert!(text.contains(series), "{series}:\n{text}");
        }
        let producer_lines: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("component=\"producer\""))
            .collect();
        assert_eq!(producer_lines.len(), 1, "{producer_lines:?}");
        producer.trapped();
        assert!(
            metrics
                .render()
                .unwrap()
                .contains("switchyard_traps_total{component=\"producer\"} 1")
        );
    }
}
