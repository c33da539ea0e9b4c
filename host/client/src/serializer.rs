//! How values become payloads and back: the original's `value_serializer` and
//! `value_deserializer` functions, as two traits a user implements for any encoding (JSON,
//! Avro, Protobuf, a compressed format of their own).
//!
//! Why two traits and not one: writing borrows a value that may be unsized (`str`, `[u8]`), and
//! reading returns an owned one, so one trait over one type could not take both `&str` and give
//! `String`. A format's type usually implements both (as [`Json`], [`Text`] and [`Bytes`] do).
//! Their methods are `encode` and `decode`, not `serialize` and `deserialize`, so that they
//! never clash with serde's on a type that also derives `Serialize` (as [`ValueSerializer`]
//! does, for the configuration).
//!
//! [`ValueSerializer`]: super::ValueSerializer
//!
//! Why content types: a serializer labels each payload with what it wrote (recorded as the
//! message's content type, on Kafka a header, on Pub/Sub an attribute), and a deserializer reads
//! by that label. Producers with different encodings can then share a topic, and a consumer that
//! meets an encoding it does not read says which one it met instead of misreading the bytes.

use std::error::Error as StdError;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A serialized value: the payload, and the content type that says how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The bytes to send.
    pub payload: Vec<u8>,
    /// What they are (`application/json`, `application/x-protobuf; messageType=shop.Order`).
    pub content_type: String,
}

/// Writes values of type `T` as payloads (the original's `value_serializer`).
pub trait Serializer<T: ?Sized>: Send + Sync {
    /// Encodes `value`, with the content type recorded on the message.
    fn encode(&self, value: &T) -> Result<Encoded, SerializerError>;
}

/// Reads payloads as values of type `T` by their content type (the original's
/// `value_deserializer`).
pub trait Deserializer<T>: Send + Sync {
    /// Decodes `payload`, which its sender labelled `content_type` (`None`: it gave no label).
    /// A payload of a content type this deserializer does not read is refused with
    /// [`SerializerError::unknown_content_type`], not guessed at.
    fn decode(&self, payload: &[u8], content_type: Option<&str>) -> Result<T, SerializerError>;
}

/// The error a serializer's own failure is carried in.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Why a value could not be written or a payload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SerializerError {
    /// The value cannot be written in this format.
    #[error("cannot serialize the value as {content_type}: {source}")]
    Serialize {
        /// The format's content type.
        content_type: String,
        /// Why.
        source: BoxError,
    },
    /// The payload is not a valid value of the requested type in its format.
    #[error("cannot read the payload ({content_type}) as the requested type: {source}")]
    Deserialize {
        /// The payload's content type.
        content_type: String,
        /// Why.
        source: BoxError,
    },
    /// The payload is in a format this deserializer does not read.
    #[error(
        "the payload's content type is {found:?}, and this deserializer reads {reads}: read it \
         with `Received::value_with` and a deserializer for {found:?}, or take the bytes with \
         `Received::payload`"
    )]
    UnknownContentType {
        /// The content type the message carries.
        found: String,
        /// What the deserializer reads.
        reads: String,
    },
}

impl SerializerError {
    /// `value` could not be written as `content_type`.
    pub fn serialize(content_type: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Serialize {
            content_type: content_type.into(),
            source: source.into(),
        }
    }

    /// A payload of `content_type` could not be read.
    pub fn deserialize(content_type: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Deserialize {
            content_type: content_type.into(),
            source: source.into(),
        }
    }

    /// A payload labelled `found` met a deserializer that reads `reads` (a description such
    /// as `"application/json"`).
    pub fn unknown_content_type(found: &str, reads: impl Into<String>) -> Self {
        Self::UnknownContentType {
            found: found.to_string(),
            reads: reads.into(),
        }
    }
}

/// The media type of a content type, lowercased, without parameters
/// (`Application/JSON; charset=utf-8` → `application/json`).
pub fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// The value of parameter `name` of a content type, matched without regard to case and
/// unquoted (`messageType` of `application/x-protobuf; messageType="shop.Order"` →
/// `shop.Order`).
pub fn content_type_parameter<'a>(content_type: &'a str, name: &str) -> Option<&'a str> {
    content_type
        .split(';')
        .skip(1)
        .filter_map(|parameter| parameter.split_once('='))
        .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
        .map(|(_, value)| value.trim().trim_matches('"'))
}

/// JSON through serde (`application/json`). Reads `application/json`, any `+json` type
/// (`application/cloudevents+json`), and payloads without a content type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json;

impl Json {
    /// What it writes.
    pub const CONTENT_TYPE: &'static str = "application/json";

    /// Whether it reads payloads of `content_type`.
    pub fn reads(content_type: &str) -> bool {
        let essence = essence(content_type);
        essence == Self::CONTENT_TYPE || essence.ends_with("+json")
    }
}

impl<T: Serialize + ?Sized> Serializer<T> for Json {
    fn encode(&self, value: &T) -> Result<Encoded, SerializerError> {
        let payload = serde_json::to_vec(value)
            .map_err(|e| SerializerError::serialize(Self::CONTENT_TYPE, e))?;
        Ok(Encoded {
            payload,
            content_type: Self::CONTENT_TYPE.to_string(),
        })
    }
}

impl<T: DeserializeOwned> Deserializer<T> for Json {
    fn decode(&self, payload: &[u8], content_type: Option<&str>) -> Result<T, SerializerError> {
        let content_type = content_type.unwrap_or(Self::CONTENT_TYPE);
        if !Self::reads(content_type) {
            return Err(SerializerError::unknown_content_type(
                content_type,
                "application/json and +json types",
            ));
        }
        serde_json::from_slice(payload).map_err(|e| SerializerError::deserialize(content_type, e))
    }
}

/// UTF-8 text (`text/plain; charset=utf-8`): values that serde writes as a string (`str`,
/// `String`, unit enums). Reads any `text/*` type and payloads without a content type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Text;

impl Text {
    /// What it writes.
    pub const CONTENT_TYPE: &'static str = "text/plain; charset=utf-8";

    /// Whether it reads payloads of `content_type`.
    pub fn reads(content_type: &str) -> bool {
        essence(content_type).starts_with("text/")
    }
}

impl<T: Serialize + ?Sized> Serializer<T> for Text {
    fn encode(&self, value: &T) -> Result<Encoded, SerializerError> {
        let error = |reason: String| SerializerError::serialize(Self::CONTENT_TYPE, reason);
        match serde_json::to_value(value).map_err(|e| error(e.to_string()))? {
            serde_json::Value::String(text) => Ok(Encoded {
                payload: text.into_bytes(),
                content_type: Self::CONTENT_TYPE.to_string(),
            }),
            other => Err(error(format!(
                "the text serializer takes strings, not {other}; use \"json\" for structured \
                 values"
            ))),
        }
    }
}

impl<T: DeserializeOwned> Deserializer<T> for Text {
    fn decode(&self, payload: &[u8], content_type: Option<&str>) -> Result<T, SerializerError> {
        let content_type = content_type.unwrap_or(Self::CONTENT_TYPE);
        if !Self::reads(content_type) {
            return Err(SerializerError::unknown_content_type(
                content_type,
                "text/* types",
            ));
        }
        let error = |reason: String| SerializerError::deserialize(content_type, reason);
        let text = std::str::from_utf8(payload).map_err(|e| error(e.to_string()))?;
        serde_json::from_value(serde_json::Value::String(text.to_string()))
            .map_err(|e| error(format!("{e} (text payloads read as String)")))
    }
}

/// Raw bytes (`application/octet-stream`): values that serde writes as a sequence of bytes
/// (`[u8]`, `Vec<u8>`). Reads every payload, whatever its content type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bytes;

impl Bytes {
    /// What it writes.
    pub const CONTENT_TYPE: &'static str = "application/octet-stream";
}

impl<T: Serialize + ?Sized> Serializer<T> for Bytes {
    fn encode(&self, value: &T) -> Result<Encoded, SerializerError> {
        let error = |reason: String| SerializerError::serialize(Self::CONTENT_TYPE, reason);
        let value = serde_json::to_value(value).map_err(|e| error(e.to_string()))?;
        let payload = value
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .map(|v| v.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect::<Option<Vec<u8>>>()
            })
            .ok_or_else(|| {
                error("the bytes serializer takes byte sequences (&[u8], Vec<u8>)".into())
            })?;
        Ok(Encoded {
            payload,
            content_type: Self::CONTENT_TYPE.to_string(),
        })
    }
}

impl<T: DeserializeOwned> Deserializer<T> for Bytes {
    fn decode(&self, payload: &[u8], content_type: Option<&str>) -> Result<T, SerializerError> {
        serde_json::from_value(serde_json::Value::from(payload.to_vec())).map_err(|e| {
            SerializerError::deserialize(
                content_type.unwrap_or(Self::CONTENT_TYPE),
                format!("{e} (byte payloads read as Vec<u8>)"),
            )
        })
    }
}
