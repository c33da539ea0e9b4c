//! The dead-letter format, written once for every backend: what a dead letter carries, how it
//! is made from the message that failed, and how `switchyard replay` turns it back into that
//! message.
//!
//! A dead letter is the original message (payload, key, headers, content type) plus headers
//! that say why it is there. Keeping the original untouched and the reasons beside it is what
//! lets a replay send back exactly what came in, and lets any Kafka or Pub/Sub tool read the
//! reasons without knowing switchyard. Header values are capped at Pub/Sub's 1,024-byte
//! attribute limit so a long error never makes the dead letter itself unpublishable.

use crate::{IncomingMessage, OutgoingMessage};

/// Prefix of every header a dead letter adds; a replay removes exactly these.
pub const HEADER_PREFIX: &str = "switchyard-dlq-";
/// Why the last attempt failed.
pub const ERROR: &str = "switchyard-dlq-error";
/// The component that gave up (its manifest name).
pub const COMPONENT: &str = "switchyard-dlq-component";
/// Which build of the component: `sha256:` and 12 hex digits of its `.wasm`.
pub const VERSION: &str = "switchyard-dlq-version";
/// The consumer group (Kafka) or subscription (Pub/Sub) it was received in.
pub const GROUP: &str = "switchyard-dlq-group";
/// Attempts made, the last included.
pub const ATTEMPTS: &str = "switchyard-dlq-attempts";
/// The topic it came from, where a replay sends it back.
pub const TOPIC: &str = "switchyard-dlq-topic";
/// Where it was in that topic: `partition@offset` on Kafka, the message id on Pub/Sub.
pub const POSITION: &str = "switchyard-dlq-position";

/// The longest header value a dead letter writes (Pub/Sub's attribute value limit).
const MAX_VALUE_BYTES: usize = 1024;

/// Why a message is dead-lettered, and by whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason<'a> {
    /// What the last attempt's failure was.
    pub error: &'a str,
    /// The component's manifest name.
    pub component: &'a str,
    /// The component's build (see [`VERSION`]).
    pub version: &'a str,
    /// Its consumer group or subscription.
    pub group: &'a str,
    /// Attempts made.
    pub attempts: u32,
}

/// The dead letter of `message` for `dead_letter_topic`.
pub fn dead_letter(
    message: &IncomingMessage,
    dead_letter_topic: &str,
    reason: &Reason<'_>,
) -> OutgoingMessage {
    let mut headers: Vec<(String, String)> = message
        .headers
        .iter()
        .filter(|(name, _)| !name.starts_with(HEADER_PREFIX))
        .cloned()
        .collect();
    for (name, value) in [
        (ERROR, reason.error.to_string()),
        (COMPONENT, reason.component.to_string()),
        (VERSION, reason.version.to_string()),
        (GROUP, reason.group.to_string()),
        (ATTEMPTS, reason.attempts.to_string()),
        (TOPIC, message.topic.clone()),
        (POSITION, message.position.clone()),
    ] {
        headers.push((name.to_string(), truncated(value)));
    }
    OutgoingMessage {
        topic: dead_letter_topic.to_string(),
        key: message.key.clone(),
        payload: message.payload.clone(),
        headers,
        content_type: message.content_type.clone(),
    }
}

/// Why a message cannot be replayed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    /// It has no [`TOPIC`] header, so it was not written as a dead letter by switchyard.
    #[error(
        "message {position} has no {TOPIC} header, so it is not a switchyard dead letter: \
         give the destination with --to TOPIC"
    )]
    NoOrigin {
        /// Where the message is.
        position: String,
    },
}

/// The message a dead letter came from, addressed to its original topic, or to `to` when
/// given; the dead-letter headers are removed, everything else is kept.
pub fn replay(
    dead_letter: &IncomingMessage,
    to: Option<&str>,
) -> Result<OutgoingMessage, ReplayError> {
    let origin = dead_letter
        .headers
        .iter()
        .find(|(name, _)| name == TOPIC)
        .map(|(_, topic)| topic.as_str());
    let topic = to.or(origin).ok_or_else(|| ReplayError::NoOrigin {
        position: dead_letter.position.clone(),
    })?;
    Ok(OutgoingMessage {
        topic: topic.to_string(),
        key: dead_letter.key.clone(),
        payload: dead_letter.payload.clone(),
        headers: dead_letter
            .headers
            .iter()
            .filter(|(name, _)| !name.starts_with(HEADER_PREFIX))
            .cloned()
            .collect(),
        content_type: dead_letter.content_type.clone(),
    })
}

/// The value cut to [`MAX_VALUE_BYTES`] at a character boundary, with an ellipsis when cut.
fn truncated(mut value: String) -> String {
    if value.len() <= MAX_VALUE_BYTES {
        return value;
    }
    let mut end = MAX_VALUE_BYTES - '…'.len_utf8();
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value.truncate(end);
    value.push('…');
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> IncomingMessage {
        IncomingMessage {
            topic: "requests".into(),
            position: "3@1041".into(),
            partition_offset: None,
            key: Some(b"k".to_vec()),
            payload: b"\x00\x01 not an image".to_vec(),
            headers: vec![
                ("request-id".into(), "R-7".into()),
                ("sent-at".into(), "12".into()),
            ],
            content_type: Some("application/octet-stream".into()),
            delivery_attempt: None,
        }
    }

    fn reason() -> Reason<'static> {
        Reason {
            error: "the handler returned an error: wrong size",
            component: "classifier",
            version: "sha256:0123456789ab",
            group: "classifier",
            attempts: 3,
        }
    }

    fn header<'a>(message: &'a OutgoingMessage, name: &str) -> Option<&'a str> {
        message
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_dead_letter_keeps_the_message_and_says_why() {
        let letter = dead_letter(&failed(), "requests.dlq", &reason());
        assert_eq!(letter.topic, "requests.dlq");
        assert_eq!(letter.payload, failed().payload);
        assert_eq!(letter.key, failed().key);
        assert_eq!(letter.content_type, failed().content_type);
        assert_eq!(&letter.headers[..2], &failed().headers[..]);
        assert_eq!(header(&letter, ERROR), Some(reason().error));
        assert_eq!(header(&letter, COMPONENT), Some("classifier"));
        assert_eq!(header(&letter, VERSION), Some("sha256:0123456789ab"));
        assert_eq!(header(&letter, GROUP), Some("classifier"));
        assert_eq!(header(&letter, ATTEMPTS), Some("3"));
        assert_eq!(header(&letter, TOPIC), Some("requests"));
        assert_eq!(header(&letter, POSITION), Some("3@1041"));
    }

    #[test]
    fn a_replay_gives_back_the_original_message() {
        let letter = dead_letter(&failed(), "requests.dlq", &reason());
        let received = IncomingMessage {
            topic: letter.topic.clone(),
            position: "0@0".into(),
            partition_offset: None,
            key: letter.key.clone(),
            payload: letter.payload.clone(),
            headers: letter.headers.clone(),
            content_type: letter.content_type.clone(),
            delivery_attempt: None,
        };
        let original = failed();
        let replayed = replay(&received, None).unwrap();
        assert_eq!(replayed.topic, original.topic);
        assert_eq!(replayed.key, original.key);
        assert_eq!(replayed.payload, original.payload);
        assert_eq!(replayed.headers, original.headers);
        assert_eq!(replayed.content_type, original.content_type);
        assert_eq!(
            replay(&received, Some("elsewhere")).unwrap().topic,
            "elsewhere"
        );
        // Dead-lettered twice, it still carries one set of reasons: the latest.
        let again = dead_letter(
            &received,
            "requests.dlq",
            &Reason {
                attempts: 1,
                ..reason()
            },
        );
        assert_eq!(
            again.headers.iter().filter(|(n, _)| n == ATTEMPTS).count(),
            1
        );
    }

    #[test]
    fn a_message_from_elsewhere_needs_a_destination() {
        let stray = failed();
        assert_eq!(
            replay(&stray, None),
            Err(ReplayError::NoOrigin {
                position: "3@1041".into()
            })
        );
        assert_eq!(replay(&stray, Some("requests")).unwrap().topic, "requests");
    }

    #[test]
    fn long_values_are_cut_to_the_attribute_limit() {
        let long = "é".repeat(2000);
        let letter = dead_letter(
            &failed(),
            "d",
            &Reason {
                error: &long,
                ..reason()
            },
        );
        let error = header(&letter, ERROR).unwrap();
        assert!(
            error.len() <= MAX_VALUE_BYTES && error.ends_with('…'),
            "{}",
            error.len()
        );
    }
}
