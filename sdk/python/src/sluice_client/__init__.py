"""Python client for Sluice's gRPC API (`sluice.v1.Inference`)."""

from .client import AsyncClient, Client
from .errors import DeadlineExceeded, InvalidArgument, Overloaded, SluiceError, Unauthenticated, Unavailable
from .types import Chunk, Completion, Logprob, Model, Usage

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "InvalidArgument",
    "Logprob",
    "Model",
    "Overloaded",
    "SluiceError",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
