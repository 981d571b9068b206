"""Plain results, independent of the generated protobuf classes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

from ._proto import inference_pb2 as pb

Prompt = Union[str, Sequence[int]]

_FINISH = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_ERROR: "error",
}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Logprob:
    token_id: int
    logprob: float
    top: List["Logprob"] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]
    usage: Optional[Usage]
    request_id: str
    logprobs: List[Logprob] = field(default_factory=list)


@dataclass(frozen=True)
class Chunk:
    """Part of a streamed completion; `finish_reason` and `usage` come with the last one."""

    text: str
    token_ids: List[int]
    finish_reason: Optional[str]
    usage: Optional[Usage]
    request_id: str
    logprobs: List[Logprob] = field(default_factory=list)


@dataclass(frozen=True)
class Model:
    id: str
    model_type: str
    vocab_size: int
    max_context: int


def _usage(message) -> Optional[Usage]:
    if not message.HasField("usage"):
        return None
    return Usage(message.usage.prompt_tokens, message.usage.completion_tokens)


def _logprobs(message) -> List[Logprob]:
    return [
        Logprob(l.token_id, l.logprob, [Logprob(t.token_id, t.logprob) for t in l.top])
        for l in message.logprobs
    ]


def completion(r: pb.GenerateResponse) -> Completion:
    return Completion(r.text, list(r.token_ids), _FINISH.get(r.finish_reason), _usage(r), r.request_id, _logprobs(r))


def chunk(c: pb.GenerateChunk) -> Chunk:
    return Chunk(c.text, list(c.token_ids), _FINISH.get(c.finish_reason), _usage(c), c.request_id, _logprobs(c))


def model(m: pb.ModelInfo) -> Model:
    return Model(m.id, m.model_type, m.vocab_size, m.max_context)


_SAMPLING = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "stop",
    "ignore_eos",
    "stop_token_ids",
    "logprobs",
    "echo",
}


def request(prompt: Prompt, chat: bool, request_id: str, sampling: dict) -> pb.GenerateRequest:
    """A `GenerateRequest`; `sampling` holds `SamplingParams` fields (None = server default)."""
    unknown = set(sampling) - _SAMPLING
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    params = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    r = pb.GenerateRequest(chat=chat, request_id=request_id, sampling=params)
    if isinstance(prompt, str):
        r.prompt = prompt
    else:
        r.prompt_token_ids.extend(int(t) for t in prompt)
    return r
