//! The embedded broker: librdkafka's mock cluster, a real Kafka-protocol broker running inside
//! this process.
//!
//! Why: no Apache Kafka can be installed on our machines, and a demo should need nothing but
//! this binary. The mock cluster speaks the Kafka protocol over TCP, so the host runs its real
//! Kafka code path against it and `kcat` can connect to it too. Its known limits: about 5 MiB
//! retained per partition (older data is dropped, so create topics with enough partitions),
//! no CreateTopics API (topics are created here, through the mock API, or auto-created with 4
//! partitions on first use), commits refused while a rebalance is in progress.
//!
//! The mock cluster listens on a random loopback port. To offer a fixed address
//! (`switchyard broker` on 127.0.0.1:9092) the broker's advertised address is set to that
//! address and a small TCP relay forwards connections from it to the real port, so clients that
//! follow the metadata come back through the fixed address.

use std::ffi::{CStr, CString};
use std::net::SocketAddr;

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka_sys as rdsys;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::{BrokerError, TopicSpec};

/// The single broker's id inside the mock cluster.
const BROKER_ID: i32 = 1;

/// A Kafka-protocol broker inside this process. Dropping it stops the broker.
pub struct EmbeddedKafka {
    cluster: *mut rdsys::rd_kafka_mock_cluster_t,
    bootstrap_servers: String,
    relay: Option<JoinHandle<()>>,
    // The mock cluster lives on this client's handle and must be destroyed before it.
    _handle: BaseProducer,
}

// SAFETY: librdkafka's mock cluster API is thread-safe: every call either takes the cluster's
// mutex or posts an operation to the cluster's own thread and waits for it. The raw pointer is
// only freed in `Drop`, which has exclusive access.
unsafe impl Send for EmbeddedKafka {}
// SAFETY: see `Send`; no method hands out references into the cluster.
unsafe impl Sync for EmbeddedKafka {}

impl std::fmt::Debug for EmbeddedKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedKafka")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .finish_non_exhaustive()
    }
}

impl EmbeddedKafka {
    /// Starts a one-broker cluster. With `listen`, the broker is reachable at that address
    /// (for other processes and `kcat`); without, on a random loopback port.
    ///
    /// Must be called inside a Tokio runtime when `listen` is given (the relay is a task).
    pub async fn start(listen: Option<SocketAddr>) -> Result<Self, BrokerError> {
        let listener = match listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                BrokerError::unavailable(format!(
                    "cannot listen on {addr} for the embedded broker. Is another broker \
                     running there? Stop it or choose another port (--port)"
                ))
                .with_source(e)
            })?),
            None => None,
        };

        let handle: BaseProducer = ClientConfig::new()
            .set("log_level", "3")
            .create()
            .map_err(|e| BrokerError::config("cannot create the embedded broker").with_source(e))?;
        // SAFETY: the handle is a live client; the cluster is destroyed in Drop before it.
        let cluster = unsafe { rdsys::rd_kafka_mock_cluster_new(handle.client().native_ptr(), 1) };
        if cluster.is_null() {
            return Err(BrokerError::config(
                "librdkafka could not start its mock cluster (see the log above)",
            ));
        }
        // New groups rebalance at once instead of waiting 3 s for more members: a demo's
        // consumers start together, and the first prediction should not wait.
        // SAFETY: cluster is valid.
        unsafe { rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0) };

        // SAFETY: cluster is valid; the returned string is owned by the cluster and copied here.
        let real = unsafe { CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(cluster)) }
            .to_string_lossy()
            .into_owned();

        let mut embedded = Self {
            cluster,
            bootstrap_servers: real.clone(),
            relay: None,
            _handle: handle,
        };
        if let Some(listener) = listener {
            let public = listener.local_addr().map_err(|e| {
                BrokerError::unavailable("the embedded broker's listener has no address")
                    .with_source(e)
            })?;
            let host = CString::new(public.ip().to_string())
                .map_err(|e| BrokerError::config("the listener's address").with_source(e))?;
            // SAFETY: cluster is valid, host is a NUL-terminated string copied by the callee.
            unsafe {
                rdsys::rd_kafka_mock_broker_set_host_port(
                    cluster,
                    BROKER_ID,
                    host.as_ptr(),
                    i32::from(public.port()),
                )
            };
            embedded.bootstrap_servers = public.to_string();
            embedded.relay = Some(tokio::spawn(relay(listener, real)));
        }
        Ok(embedded)
    }

    /// The `bootstrap.servers` value clients use to reach this broker.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Creates a topic; an existing topic is left as it is. Says whether it created it.
    pub fn create_topic(&self, topic: &TopicSpec) -> Result<bool, BrokerError> {
        let name = CString::new(topic.name.as_str()).map_err(|_| {
            BrokerError::rejected(format!("topic name {:?} contains a NUL byte", topic.name))
        })?;
        // SAFETY: cluster is valid; name is NUL-terminated and copied by the callee.
        let err = unsafe {
            rdsys::rd_kafka_mock_topic_create(self.cluster, name.as_ptr(), topic.partitions, 1)
        };
        let code: rdkafka::types::RDKafkaErrorCode = err.into();
        match code {
            rdkafka::types::RDKafkaErrorCode::NoError => Ok(true),
            rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists => Ok(false),
            other => Err(BrokerError::rejected(format!(
                "the embedded broker refused to create topic {:?}: {other}",
                topic.name
            ))
            .with_code(format!("{other:?}"))),
        }
    }
}

/// Requests of the Kafka protocol the embedded broker can be told to fail
/// ([`EmbeddedKafka::fail_requests`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKey {
    /// Produce (key 0): what publishers send.
    Produce,
    /// Fetch (key 1): what consumers read with.
    Fetch,
    /// OffsetCommit (key 8): a consumer group's commits.
    OffsetCommit,
    /// Heartbeat (key 12): a group member's liveness.
    Heartbeat,
}

impl ApiKey {
    fn code(self) -> i16 {
        match self {
            Self::Produce => 0,
            Self::Fetch => 1,
            Self::OffsetCommit => 8,
            Self::Heartbeat => 12,
        }
    }
}

/// Fault injection, through the mock cluster's own API: for tests and drills of what the
/// host does when the broker misbehaves.
impl EmbeddedKafka {
    /// Takes the broker down: it drops its connections and refuses new ones until
    /// [`Self::set_up`].
    pub fn set_down(&self) {
        // SAFETY: cluster is valid; the broker id exists.
        unsafe { rdsys::rd_kafka_mock_broker_set_down(self.cluster, BROKER_ID) };
    }

    /// Brings the broker back after [`Self::set_down`].
    pub fn set_up(&self) {
        // SAFETY: cluster is valid; the broker id exists.
        unsafe { rdsys::rd_kafka_mock_broker_set_up(self.cluster, BROKER_ID) };
    }

    /// Delays every response by `rtt` (zero: no delay).
    pub fn set_round_trip(&self, rtt: std::time::Duration) {
        let ms = i32::try_from(rtt.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: cluster is valid; the broker id exists.
        unsafe { rdsys::rd_kafka_mock_broker_set_rtt(self.cluster, BROKER_ID, ms) };
    }

    /// Answers the next requests of `api`, one each, with `errors` (then normally again).
    pub fn fail_requests(&self, api: ApiKey, errors: &[rdkafka::types::RDKafkaErrorCode]) {
        let errors: Vec<rdsys::rd_kafka_resp_err_t> = errors
            .iter()
            .filter_map(|&code| rdsys::rd_kafka_resp_err_t::try_from(code as i32).ok())
            .collect();
        // SAFETY: cluster is valid; the array is read for `errors.len()` elements and copied.
        unsafe {
            rdsys::rd_kafka_mock_push_request_errors_array(
                self.cluster,
                api.code(),
                errors.len(),
                errors.as_ptr(),
            )
        };
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        if let Some(relay) = self.relay.take() {
            relay.abort();
        }
        // SAFETY: created in `start`, destroyed exactly once, before its client handle.
        unsafe { rdsys::rd_kafka_mock_cluster_destroy(self.cluster) };
    }
}

/// Forwards every connection accepted on the public address to the mock broker's real port.
async fn relay(listener: TcpListener, target: String) {
    loop {
        let (mut inbound, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("embedded broker: accept failed: {e}");
                continue;
            }
        };
        let target = target.clone();
        tokio::spawn(async move {
            match TcpStream::connect(&target).await {
                Ok(mut outbound) => {
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
                    {
                        tracing::debug!("embedded broker: connection from {peer} ended: {e}");
                    }
                }
                Err(e) => tracing::warn!("embedded broker: cannot reach the mock broker: {e}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_is_reported_with_the_fix() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = EmbeddedKafka::start(Some(addr)).await.unwrap_err();
        assert!(
            err.to_string().contains("Is another broker running there"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn listens_on_the_address_it_was_given() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let broker = EmbeddedKafka::start(Some(addr)).await.unwrap();
        assert_eq!(broker.bootstrap_servers(), addr.to_string());
        let topic = TopicSpec {
            name: "t".into(),
            partitions: 3,
        };
        assert!(broker.create_topic(&topic).unwrap(), "created");
        assert!(!broker.create_topic(&topic).unwrap(), "left as it was");
    }
}
