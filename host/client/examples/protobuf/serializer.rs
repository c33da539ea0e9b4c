//! A serializer of one's own: Protobuf through prost, for any message type prost generated
//! from a `.proto` file (with `prost_build::Config::enable_type_names`, so each type knows its
//! full name).
//!
//! Each payload is labelled `application/x-protobuf; messageType=PACKAGE.Message`, so a reader
//! knows what it holds without guessing from the bytes (Protobuf bytes carry no type), and a
//! consumer of `shop.Order` refuses a payload of another type or format, naming it.

use std::marker::PhantomData;

use switchyard_client::{
    Deserializer, Encoded, Serializer, SerializerError, content_type_parameter, essence,
};

/// Protobuf values of message type `M`.
pub struct Protobuf<M> {
    _message: PhantomData<fn() -> M>,
}

impl<M: prost::Name> Protobuf<M> {
    /// The media type of Protobuf payloads.
    pub const MEDIA_TYPE: &'static str = "application/x-protobuf";

    /// A serializer of `M`.
    pub fn new() -> Self {
        Self {
            _message: PhantomData,
        }
    }

    /// What payloads of `M` are labelled: `application/x-protobuf; messageType=shop.Order`.
    pub fn content_type() -> String {
        format!("{}; messageType={}", Self::MEDIA_TYPE, M::full_name())
    }
}

impl<M: prost::Name> Default for Protobuf<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: prost::Message + prost::Name> Serializer<M> for Protobuf<M> {
    fn encode(&self, value: &M) -> Result<Encoded, SerializerError> {
        Ok(Encoded {
            payload: value.encode_to_vec(),
            content_type: Self::content_type(),
        })
    }
}

impl<M: prost::Message + prost::Name + Default> Deserializer<M> for Protobuf<M> {
    fn decode(&self, payload: &[u8], content_type: Option<&str>) -> Result<M, SerializerError> {
        let expected = Self::content_type();
        // An unlabelled payload is taken for what this consumer reads, as the built-in
        // serializers take theirs.
        let content_type = content_type.unwrap_or(&expected);
        let message_type = content_type_parameter(content_type, "messageType");
        if essence(content_type) != Self::MEDIA_TYPE
            || message_type != Some(M::full_name().as_str())
        {
            return Err(SerializerError::unknown_content_type(
                content_type,
                expected.as_str(),
            ));
        }
        M::decode(payload).map_err(|e| SerializerError::deserialize(content_type, e))
    }
}
