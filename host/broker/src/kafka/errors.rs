//! librdkafka's errors as [`BrokerError`]s: one table of codes to kinds, and the client
//! contexts that turn librdkafka's error callbacks into clear errors and bounded logs.

use std::sync::Arc;

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::outage::OutageLog;
use crate::{BrokerError, ErrorKind};

/// Keeps the last connection error librdkafka reported: its metadata call says only
/// "transport failure" or "timed out", while the reason (a failed TLS handshake, a refused
/// login) arrives through the error callback.
#[derive(Default)]
pub(super) struct ConnectionErrors {
    last: std::sync::Mutex<Option<String>>,
}

impl ConnectionErrors {
    pub(super) fn last(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ClientContext for ConnectionErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!("librdkafka: {error}: {reason}");
        // "1/1 brokers are down" follows the reason and would hide it.
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        }
    }
}

impl rdkafka::producer::ProducerContext for ConnectionErrors {
    type DeliveryOpaque = ();

    // The probe sends nothing.
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// The kind and the fix of a connection failure whose reason names TLS or SASL, which a
/// wrong `security.protocol`, certificate or credentials cause.
pub(super) fn connection_fix(reason: &str) -> Option<(ErrorKind, &'static str)> {
    let reason = reason.to_ascii_lowercase();
    if reason.contains("ssl") || reason.contains("certificate") {
        Some((
            ErrorKind::Config,
            "The TLS connection failed: security.protocol=SSL or SASL_SSL needs a TLS listener \
             (PLAINTEXT and SASL_PLAINTEXT a plain one), and a broker certificate the host \
             trusts (ssl.ca.location names the CA file when it is not a system one)",
        ))
    } else if reason.contains("sasl") || reason.contains("authentication") {
        Some((
            ErrorKind::PermissionDenied,
            "The broker refused the login: check sasl.mechanisms (PLAIN, SCRAM-SHA-256, \
             SCRAM-SHA-512 or OAUTHBEARER), sasl.username and sasl.password, and that \
             security.protocol is SASL_SSL or SASL_PLAINTEXT as the listener expects",
        ))
    } else {
        None
    }
}

pub(super) fn config_error(e: KafkaError) -> BrokerError {
    BrokerError::config(
        "invalid Kafka settings. Check the [broker.kafka] properties against librdkafka's \
         CONFIGURATION.md",
    )
    .with_source(e)
}

/// The librdkafka error code of an error, admin operations included (rdkafka's own accessor
/// leaves those out).
pub(super) fn error_code(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    }
}

/// Whether a broker's error passes by itself: the request may succeed when tried again.
pub(super) fn is_transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::RebalanceInProgress
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::CoordinatorLoadInProgress
            | RDKafkaErrorCode::CoordinatorNotAvailable
            | RDKafkaErrorCode::NotCoordinator
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
            | RDKafkaErrorCode::KafkaStorageError
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::OperationTimedOut
    )
}

/// The kind of a librdkafka error, by its code; errors without a code (a client that could
/// not be created) are configuration errors.
pub(super) fn error_kind(e: &KafkaError) -> ErrorKind {
    let Some(code) = error_code(e) else {
        return match e {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorKind::Config,
            KafkaError::Canceled => ErrorKind::Closed,
            _ => ErrorKind::Unavailable,
        };
    };
    match code {
        RDKafkaErrorCode::MessageTimedOut
        | RDKafkaErrorCode::RequestTimedOut
        | RDKafkaErrorCode::OperationTimedOut => ErrorKind::Timeout,
        RDKafkaErrorCode::TopicAuthorizationFailed
        | RDKafkaErrorCode::GroupAuthorizationFailed
        | RDKafkaErrorCode::ClusterAuthorizationFailed
        | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
        | RDKafkaErrorCode::DelegationTokenAuthorizationFailed
        | RDKafkaErrorCode::SaslAuthenticationFailed
        | RDKafkaErrorCode::Authentication => ErrorKind::PermissionDenied,
        RDKafkaErrorCode::UnknownTopicOrPartition
        | RDKafkaErrorCode::UnknownTopic
        | RDKafkaErrorCode::UnknownPartition => ErrorKind::NotFound,
        RDKafkaErrorCode::InvalidTopic
        | RDKafkaErrorCode::MessageSizeTooLarge
        | RDKafkaErrorCode::InvalidMessageSize
        | RDKafkaErrorCode::InvalidMessage
        | RDKafkaErrorCode::InvalidRecord
        | RDKafkaErrorCode::MessageBatchTooLarge
        | RDKafkaErrorCode::PolicyViolation
        | RDKafkaErrorCode::InvalidPartitions
        | RDKafkaErrorCode::InvalidReplicationFactor
        | RDKafkaErrorCode::InvalidConfig
        | RDKafkaErrorCode::InvalidRequest
        | RDKafkaErrorCode::UnsupportedVersion => ErrorKind::Rejected,
        RDKafkaErrorCode::BrokerDestroy => ErrorKind::Closed,
        // The transient codes (`is_transient`), and those unknown to this table: librdkafka
        // retries most errors by itself, so treat them as ones that may pass.
        _ => ErrorKind::Unavailable,
    }
}

/// A librdkafka error as a [`BrokerError`]: its kind, its code and the error itself.
pub(super) fn kafka_error(what: &str, e: &KafkaError) -> BrokerError {
    let kind = error_kind(e);
    let message = match kind {
        ErrorKind::PermissionDenied => format!(
            "{what}: the broker refused the credentials or their rights. Check sasl.username, \
             sasl.password and the ACLs of the topic and the group"
        ),
        _ => what.to_string(),
    };
    BrokerError::new(kind, message)
        .with_code_if(error_code(e))
        .with_source(e.clone())
}

/// A topic operation's refusal as a [`BrokerError`]: missing rights stay
/// [`ErrorKind::PermissionDenied`], a request the broker can serve later stays transient, and
/// the rest is [`ErrorKind::Rejected`].
pub(super) fn admin_op_error(what: &str, code: RDKafkaErrorCode) -> BrokerError {
    let kind = match error_kind(&KafkaError::AdminOp(code)) {
        kind @ (ErrorKind::PermissionDenied | ErrorKind::Unavailable | ErrorKind::Timeout) => kind,
        _ => ErrorKind::Rejected,
    };
    let fix = match kind {
        ErrorKind::PermissionDenied => ": the credentials lack the rights (ACLs) for it",
        ErrorKind::Unavailable | ErrorKind::Timeout => ": the cluster cannot do it now; try again",
        _ => "",
    };
    BrokerError::new(kind, format!("{what}: {code}{fix}")).with_code(format!("{code:?}"))
}

/// Sends librdkafka's own error reports (a broker unreachable, each failed reconnect) to an
/// outage log instead of rdkafka's default of one error line each, which floods the log for
/// as long as a broker is away. Its clients retry by themselves; what fails for good reaches
/// the caller as a delivery or receive error.
pub(super) struct ClientErrors {
    pub(super) outage: Arc<OutageLog>,
}

impl ClientContext for ClientErrors {
    fn error(&self, error: KafkaError, reason: &str) {
        self.outage.error(&kafka_error(reason, &error));
    }
}

/// For the transactional producer, whose transaction's commit reports every delivery
/// failure: a message's own delivery report says nothing more.
impl rdkafka::producer::ProducerContext for ClientErrors {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}
