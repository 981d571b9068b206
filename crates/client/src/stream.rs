//! The chunks of a streamed generation.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use sluice_proto::v1::GenerateChunk;
use tonic::Streaming;

use crate::ClientError;

/// A `Stream` of the chunks of one generation, the first already received. Dropping it
/// resets the HTTP/2 stream, which cancels the request on the server and frees its cache.
pub struct GenerateStream {
    first: Option<GenerateChunk>,
    rest: Streaming<GenerateChunk>,
}

impl GenerateStream {
    pub(crate) fn new(first: Option<GenerateChunk>, rest: Streaming<GenerateChunk>) -> Self {
        GenerateStream { first, rest }
    }
}

impl Stream for GenerateStream {
    type Item = Result<GenerateChunk, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        Pin::new(&mut this.rest)
            .poll_next(cx)
            .map(|item| item.map(|r| r.map_err(ClientError::from)))
    }
}
