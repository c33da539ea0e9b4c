//! How a message's headers, content type and key travel, written once for every backend.
//!
//! Kafka headers are an ordered list that may repeat a name; Pub/Sub attributes are a map.
//! Switchyard promises the same message on both, so it takes what both can keep: headers are
//! a map (a repeated name keeps its last value), received headers come sorted by name, and
//! the content type travels as one `content-type` header that is never also a header of its
//! own. An empty key is no key, as Pub/Sub has no empty ordering key. What only one backend
//! refuses (a Pub/Sub ordering key that is not text, an attribute name starting with `goog`)
//! is checked by that backend.

use std::collections::BTreeMap;

use crate::{CONTENT_TYPE_HEADER, IncomingMessage, OutgoingMessage};

/// A message's headers as every backend sends them: one per name, sorted by name, the
/// content type last as the `content-type` header.
///
/// The message's `content_type` wins over a `content-type` header (any case) among its
/// headers; without one, the last such header is the content type.
pub(crate) fn outgoing_headers(message: &OutgoingMessage) -> Vec<(&str, &str)> {
    let mut content_type = message.content_type.as_deref();
    let mut headers = BTreeMap::new();
    for (name, value) in &message.headers {
        if name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER) {
            if message.content_type.is_none() {
                content_type = Some(value);
            }
        } else {
            headers.insert(name.as_str(), value.as_str());
        }
    }
    let mut headers: Vec<(&str, &str)> = headers.into_iter().collect();
    if let Some(content_type) = content_type {
        headers.push((CONTENT_TYPE_HEADER, content_type));
    }
    headers
}

/// Received headers, split into the content type and the rest, one per name and sorted.
pub(crate) fn incoming_headers(
    received: impl IntoIterator<Item = (String, String)>,
) -> (Vec<(String, String)>, Option<String>) {
    let mut content_type = None;
    let mut headers = BTreeMap::new();
    for (name, value) in received {
        if name.eq_ignore_ascii_case(CONTENT_TYPE_HEADER) {
            content_type = Some(value);
        } else {
            headers.insert(name, value);
        }
    }
    (headers.into_iter().collect(), content_type)
}

/// The key a message is sent with: none when it has none or an empty one.
pub(crate) fn outgoing_key(message: &OutgoingMessage) -> Option<&[u8]> {
    message.key.as_deref().filter(|key| !key.is_empty())
}

/// The key of a received message: an empty one is none.
pub(crate) fn incoming_key(key: Option<&[u8]>) -> Option<Vec<u8>> {
    key.filter(|key| !key.is_empty()).map(<[u8]>::to_vec)
}

/// Fills an [`IncomingMessage`] from the parts every backend receives.
pub(crate) fn incoming_message(
    topic: &str,
    position: String,
    key: Option<&[u8]>,
    payload: Vec<u8>,
    headers: impl IntoIterator<Item = (String, String)>,
    delivery_attempt: Option<u32>,
) -> IncomingMessage {
    let (headers, content_type) = incoming_headers(headers);
    IncomingMessage {
        topic: topic.to_string(),
        position,
        partition_offset: None,
        key: incoming_key(key),
        payload,
        headers,
        content_type,
        delivery_attempt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(headers: &[(&str, &str)], content_type: Option<&str>) -> OutgoingMessage {
        OutgoingMessage {
            topic: "t".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            content_type: content_type.map(str::to_string),
            ..OutgoingMessage::default()
        }
    }

    #[test]
    fn the_content_type_is_sent_once_and_the_explicit_one_wins() {
        let sent = message(
            &[("b", "1"), ("Content-Type", "text/plain"), ("a", "2")],
            Some("application/json"),
        );
        assert_eq!(
            outgoing_headers(&sent),
            [("a", "2"), ("b", "1"), ("content-type", "application/json")]
        );
        let from_header = message(&[("content-type", "text/plain")], None);
        assert_eq!(
            outgoing_headers(&from_header),
            [("content-type", "text/plain")]
        );
    }

    #[test]
    fn a_repeated_header_keeps_its_last_value_and_received_headers_are_sorted() {
        let sent = message(&[("z", "1"), ("a", "x"), ("z", "2")], None);
        assert_eq!(outgoing_headers(&sent), [("a", "x"), ("z", "2")]);
        let (headers, content_type) = incoming_headers([
            ("z".to_string(), "1".to_string()),
            ("CONTENT-TYPE".to_string(), "text/csv".to_string()),
            ("a".to_string(), "2".to_string()),
        ]);
        assert_eq!(
            headers,
            [
                ("a".to_string(), "2".to_string()),
                ("z".to_string(), "1".to_string())
            ]
        );
        assert_eq!(content_type.as_deref(), Some("text/csv"));
    }

    #[test]
    fn an_empty_key_is_no_key() {
        let mut sent = message(&[], None);
        sent.key = Some(Vec::new());
        assert_eq!(outgoing_key(&sent), None);
        assert_eq!(incoming_key(Some(b"")), None);
        assert_eq!(incoming_key(Some(b"k")), Some(b"k".to_vec()));
    }
}
