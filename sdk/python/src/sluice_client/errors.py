"""gRPC failures as exceptions, by what the caller should do about them."""

from __future__ import annotations

import grpc


class SluiceError(Exception):
    """A call failed; `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(SluiceError):
    """The request was refused as invalid; the details name the field. Do not retry."""


class Overloaded(SluiceError):
    """The router's admission queue is full (RESOURCE_EXHAUSTED): retry later, with backoff."""


class Unavailable(SluiceError):
    """No worker can take the request, or the router cannot be reached."""


class DeadlineExceeded(SluiceError):
    """The request's deadline passed."""


class Unauthenticated(SluiceError):
    """The router wants an API key and this client's is missing or wrong. Do not retry."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def from_rpc_error(error: grpc.RpcError) -> SluiceError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    return _BY_CODE.get(code, SluiceError)(code, details)
