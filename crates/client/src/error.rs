//! What can go wrong calling Sluice, by what the caller should do about it.

use tonic::Code;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("invalid endpoint `{endpoint}`: {message}")]
    InvalidEndpoint { endpoint: String, message: String },
    #[error("cannot connect to {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    /// The request was refused as invalid; the message names the field. Do not retry.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The router's admission queue is full (`RESOURCE_EXHAUSTED`): retry later, with backoff.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// No worker can take the request, or the router is unreachable, after the retries.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request's deadline passed (in the queue or while generating).
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The router wants an API key and this client's is missing or wrong
    /// (`UNAUTHENTICATED`). Do not retry with the same key.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The API key given to the builder cannot be sent as a header value.
    #[error("the API key is not valid header text")]
    InvalidApiKey,
    /// Any other gRPC status (e.g. `NOT_FOUND` for an unknown model, `INTERNAL`).
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(tonic::Status),
}

impl ClientError {
    /// The gRPC status code behind this error; `None` when no call was made.
    pub fn code(&self) -> Option<Code> {
        Some(match self {
            ClientError::InvalidEndpoint { .. }
            | ClientError::Connect { .. }
            | ClientError::InvalidApiKey => return None,
            ClientError::Unauthenticated(_) => Code::Unauthenticated,
            ClientError::InvalidArgument(_) => Code::InvalidArgument,
            ClientError::Overloaded(_) => Code::ResourceExhausted,
            ClientError::Unavailable(_) => Code::Unavailable,
            ClientError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ClientError::Cancelled(_) => Code::Cancelled,
            ClientError::Rpc(s) => s.code(),
        })
    }

    /// The server's message (or the connection error's).
    pub fn message(&self) -> String {
        match self {
            ClientError::InvalidEndpoint { message, .. } | ClientError::Connect { message, .. } => {
                message.clone()
            }
            ClientError::InvalidArgument(m)
            | ClientError::Overloaded(m)
            | ClientError::Unavailable(m)
            | ClientError::DeadlineExceeded(m)
            | ClientError::Cancelled(m)
            | ClientError::Unauthenticated(m) => m.clone(),
            ClientError::InvalidApiKey => self.to_string(),
            ClientError::Rpc(s) => s.message().to_string(),
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        let message = s.message().to_string();
        match s.code() {
            Code::InvalidArgument => ClientError::InvalidArgument(message),
            Code::ResourceExhausted => ClientError::Overloaded(message),
            Code::Unavailable => ClientError::Unavailable(message),
            Code::DeadlineExceeded => ClientError::DeadlineExceeded(message),
            Code::Cancelled => ClientError::Cancelled(message),
            Code::Unauthenticated => ClientError::Unauthenticated(message),
            _ => ClientError::Rpc(s),
        }
    }
}

/// An error and its causes on one line (a transport error's own message is often just
/// "transport error").
pub(crate) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_their_kind_and_keep_code_and_message() {
        for code in [
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::NotFound,
            Code::Internal,
        ] {
            let e = ClientError::from(tonic::Status::new(code, "why"));
            assert_eq!(e.code(), Some(code));
            assert_eq!(e.message(), "why");
        }
        assert!(matches!(
            ClientError::from(tonic::Status::resource_exhausted("full")),
            ClientError::Overloaded(_)
        ));
    }
}
