//! Pub/Sub's gRPC errors as [`BrokerError`]s, by their status code.

use google_cloud_gax::error::rpc::Code;

use crate::{BrokerError, ErrorKind};

/// A Pub/Sub error (or a publish's shared one) as a [`BrokerError`]: its kind by the gRPC
/// code, the code, and the error.
pub(super) fn rpc_error<E>(what: &str, e: E) -> BrokerError
where
    E: std::borrow::Borrow<google_cloud_pubsub::Error> + std::error::Error + Send + Sync + 'static,
{
    let code = e.borrow().status().map(|s| s.code);
    let (kind, message) = match code {
        Some(Code::NotFound) => (
            ErrorKind::NotFound,
            format!("{what}: not found. Create it, or set create_resources = true"),
        ),
        Some(Code::PermissionDenied | Code::Unauthenticated) => (
            ErrorKind::PermissionDenied,
            format!(
                "{what}: permission denied. Check the credentials (Application Default \
                 Credentials, or GOOGLE_APPLICATION_CREDENTIALS) and their IAM roles"
            ),
        ),
        Some(Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange) => {
            (ErrorKind::Rejected, what.to_string())
        }
        Some(Code::DeadlineExceeded) => (ErrorKind::Timeout, what.to_string()),
        Some(Code::Cancelled) => (ErrorKind::Closed, what.to_string()),
        _ if e.borrow().is_timeout() => (ErrorKind::Timeout, what.to_string()),
        _ => (ErrorKind::Unavailable, what.to_string()),
    };
    BrokerError::new(kind, message)
        .with_code_if(code)
        .with_source(e)
}

pub(super) fn is_code(e: &google_cloud_pubsub::Error, wanted: Code) -> bool {
    e.status().is_some_and(|s| s.code == wanted)
}
