//! The one error type of the broker layer.
//!
//! Callers decide by *kind*, never by text: the runtime retries what is transient, the guest
//! hears `permission-denied` when a broker refuses its credentials, the CLI prints the fix.
//! Each backend maps its own codes to a kind in one place (`kafka_error`, `rpc_error`) and
//! keeps the code and the backend's error beside it, so a log or a bug report still shows
//! exactly what the broker said.

use std::error::Error as StdError;
use std::fmt;

/// What kind of failure a [`BrokerError`] is: what its caller can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The broker could not be reached, or answered that it cannot serve the request now
    /// (a leader moving, a rebalance). Trying again later may succeed.
    Unavailable,
    /// The broker did not answer in time. Trying again later may succeed.
    Timeout,
    /// The broker refused the credentials or their rights: fix the credentials or the ACLs.
    PermissionDenied,
    /// A topic, subscription or partition does not exist.
    NotFound,
    /// The broker or the backend refused this request as it is (an invalid name, a message
    /// too large); sending it again will not help.
    Rejected,
    /// The settings given to the backend are wrong.
    Config,
    /// The subscription or client was closed; nothing more will come through it.
    Closed,
}

impl ErrorKind {
    /// Whether the same request may succeed when tried again later.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Unavailable | Self::Timeout)
    }
}

/// What went wrong talking to a broker. The message says what failed and, where there is
/// one, the fix.
///
/// `{}` shows the message; `{:#}` adds the chain of underlying errors, as `anyhow` does, for
/// log lines and for the text a guest receives.
pub struct BrokerError {
    kind: ErrorKind,
    message: String,
    code: Option<String>,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl BrokerError {
    /// An error of `kind`, saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            code: None,
            source: None,
        }
    }

    /// [`ErrorKind::Unavailable`]: the broker cannot be reached now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// [`ErrorKind::Timeout`].
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }

    /// [`ErrorKind::Rejected`]: this request will never succeed as it is.
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Rejected, message)
    }

    /// [`ErrorKind::Config`]: the backend's settings are wrong.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    /// [`ErrorKind::Closed`]: the subscription or client was closed.
    pub fn closed() -> Self {
        Self::new(ErrorKind::Closed, "the broker connection is closed")
    }

    /// Records the backend's own code for the failure (`NotLeaderForPartition`,
    /// `PermissionDenied`).
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Records the backend's code when there is one, as its `Debug` name.
    pub(crate) fn with_code_if(self, code: Option<impl fmt::Debug>) -> Self {
        match code {
            Some(code) => self.with_code(format!("{code:?}")),
            None => self,
        }
    }

    /// Keeps the underlying error as this one's source.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The backend's code for the failure, when the backend gave one.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// Whether the same request may succeed when tried again later.
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }

    /// The message alone, without the underlying errors.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if f.alternate() {
            let mut cause = self.source();
            while let Some(error) = cause {
                write!(f, ": {error}")?;
                cause = error.source();
            }
        }
        Ok(())
    }
}

impl fmt::Debug for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("BrokerError");
        debug
            .field("kind", &self.kind)
            .field("message", &self.message);
        if let Some(code) = &self.code {
            debug.field("code", code);
        }
        if let Some(source) = &self.source {
            debug.field("source", source);
        }
        debug.finish()
    }
}

impl StdError for BrokerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alternate_form_adds_the_chain_of_causes_and_the_plain_form_does_not() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let error = BrokerError::unavailable("cannot reach the broker")
            .with_code("BrokerTransportFailure")
            .with_source(io);
        assert_eq!(error.to_string(), "cannot reach the broker");
        assert_eq!(format!("{error:#}"), "cannot reach the broker: refused");
        assert_eq!(error.code(), Some("BrokerTransportFailure"));
        assert!(error.is_transient());
        assert!(error.source().is_some());
        assert!(!BrokerError::rejected("too large").is_transient());
        assert_eq!(BrokerError::closed().kind(), ErrorKind::Closed);
    }
}
