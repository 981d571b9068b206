"""`Client` (blocking) and `AsyncClient` (asyncio) over one gRPC channel each."""

from __future__ import annotations

from typing import AsyncIterator, Iterator, List, Optional, Tuple

import grpc

from . import types
from ._proto import inference_pb2 as pb
from ._proto import inference_pb2_grpc as pb_grpc
from .errors import from_rpc_error
from .types import Chunk, Completion, Model, Prompt


def _target(endpoint: str) -> str:
    for scheme in ("http://", "grpc://"):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme):]
    return endpoint


def _metadata(api_key: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    """A blocking client. `endpoint` is `host:port` (or `http://host:port`); pass
    `credentials=grpc.ssl_channel_credentials(...)` for TLS and `api_key` for a router started
    with API keys (sent as `authorization: Bearer KEY`). Usable as a context manager."""

    def __init__(self, endpoint: str, *, credentials: Optional[grpc.ChannelCredentials] = None, timeout: Optional[float] = None,
                 api_key: Optional[str] = None):
        target = _target(endpoint)
        self._channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._timeout = timeout
        self._metadata = _metadata(api_key)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: Prompt, *, chat: bool = False, request_id: str = "", timeout: Optional[float] = None, **sampling) -> Completion:
        """The whole completion. `prompt` is text or token ids; `sampling` takes the fields of
        `SamplingParams` (`max_tokens`, `temperature`, `seed`, `stop`, ...)."""
        request = types.request(prompt, chat, request_id, sampling)
        try:
            return types.completion(self._stub.Generate(request, timeout=timeout or self._timeout, metadata=self._metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def stream(self, prompt: Prompt, *, chat: bool = False, request_id: str = "", timeout: Optional[float] = None, **sampling) -> Iterator[Chunk]:
        """The completion chunk by chunk; leaving the loop early cancels the request."""
        request = types.request(prompt, chat, request_id, sampling)
        call = self._stub.GenerateStream(request, timeout=timeout or self._timeout, metadata=self._metadata)
        try:
            for c in call:
                yield types.chunk(c)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def tokenize(self, text: str, *, chat: bool = False) -> List[int]:
        try:
            return list(self._stub.Tokenize(pb.TokenizeRequest(text=text, chat=chat), timeout=self._timeout, metadata=self._metadata).token_ids)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def models(self) -> List[Model]:
        try:
            return [types.model(m) for m in self._stub.ListModels(pb.ListModelsRequest(), timeout=self._timeout, metadata=self._metadata).models]
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


class AsyncClient:
    """The asyncio client; same methods as `Client`, awaited (`stream` is an async iterator)."""

    def __init__(self, endpoint: str, *, credentials: Optional[grpc.ChannelCredentials] = None, timeout: Optional[float] = None,
                 api_key: Optional[str] = None):
        target = _target(endpoint)
        self._channel = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._timeout = timeout
        self._metadata = _metadata(api_key)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: Prompt, *, chat: bool = False, request_id: str = "", timeout: Optional[float] = None, **sampling) -> Completion:
        request = types.request(prompt, chat, request_id, sampling)
        try:
            return types.completion(await self._stub.Generate(request, timeout=timeout or self._timeout, metadata=self._metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def stream(self, prompt: Prompt, *, chat: bool = False, request_id: str = "", timeout: Optional[float] = None, **sampling) -> AsyncIterator[Chunk]:
        request = types.request(prompt, chat, request_id, sampling)
        call = self._stub.GenerateStream(request, timeout=timeout or self._timeout, metadata=self._metadata)
        try:
            async for c in call:
                yield types.chunk(c)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def tokenize(self, text: str, *, chat: bool = False) -> List[int]:
        try:
            r = await self._stub.Tokenize(pb.TokenizeRequest(text=text, chat=chat), timeout=self._timeout, metadata=self._metadata)
            return list(r.token_ids)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def models(self) -> List[Model]:
        try:
            r = await self._stub.ListModels(pb.ListModelsRequest(), timeout=self._timeout, metadata=self._metadata)
            return [types.model(m) for m in r.models]
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
