"""The Python SDK against a running `sluice up`: sync and async, unary and stream."""

import asyncio

import pytest

from sluice_client import AsyncClient, Client, InvalidArgument, SluiceError, Unavailable

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_unary_is_deterministic_and_matches_usage(endpoint):
    with Client(endpoint) as client:
        a = client.generate([1, 2, 3, 4], max_tokens=8, **GREEDY)
        b = client.generate([1, 2, 3, 4], max_tokens=8, **GREEDY)
    assert len(a.token_ids) == 8
    assert a.finish_reason == "length"
    assert a.usage.prompt_tokens == 4 and a.usage.completion_tokens == 8
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.request_id


def test_stream_gives_the_unary_tokens(endpoint):
    with Client(endpoint) as client:
        whole = client.generate("Tell me about rivers", chat=True, max_tokens=12, **GREEDY)
        chunks = list(client.stream("Tell me about rivers", chat=True, max_tokens=12, **GREEDY))
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 12


def test_leaving_a_stream_early_is_clean(endpoint):
    with Client(endpoint) as client:
        seen = []
        for chunk in client.stream([5, 6, 7], max_tokens=500, **GREEDY):
            seen.append(chunk)
            if len(seen) == 2:
                break
        # The channel is still good for the next call.
        assert len(client.generate([5, 6, 7], max_tokens=2, **GREEDY).token_ids) == 2


def test_seed_logprobs_and_stop_ids(endpoint):
    with Client(endpoint) as client:
        a = client.generate([9, 8, 7], max_tokens=6, temperature=0.9, seed=42, ignore_eos=True)
        b = client.generate([9, 8, 7], max_tokens=6, temperature=0.9, seed=42, ignore_eos=True)
        assert a.token_ids == b.token_ids
        lp = client.generate([9, 8, 7], max_tokens=3, logprobs=2, **GREEDY)
        assert len(lp.logprobs) == 3
        for entry, token in zip(lp.logprobs, lp.token_ids):
            assert entry.token_id == token and entry.logprob <= 0.0
            assert len(entry.top) == 2
        first = lp.token_ids[0]
        stopped = client.generate([9, 8, 7], max_tokens=3, stop_token_ids=[first], **GREEDY)
        assert stopped.token_ids == [first] and stopped.finish_reason == "stop"


def test_errors_are_typed(endpoint):
    with Client(endpoint) as client:
        with pytest.raises(InvalidArgument) as e:
            client.generate([1, 2], max_tokens=4, temperature=-1.0)
        assert "temperature" in e.value.details
        with pytest.raises(TypeError):
            client.generate([1, 2], max_token=4)
    with Client("127.0.0.1:1", timeout=5) as nowhere:
        with pytest.raises(Unavailable):
            nowhere.models()


def test_tokenize_and_models(endpoint):
    with Client(endpoint) as client:
        models = client.models()
        assert len(models) == 1 and models[0].vocab_size > 0 and models[0].max_context > 0
        ids = client.tokenize("Tell me about rivers")
        assert ids and all(0 <= i < models[0].vocab_size for i in ids)
        assert len(client.tokenize("Tell me about rivers", chat=True)) > len(ids)


def test_async_unary_and_stream(endpoint):
    async def run():
        async with AsyncClient(endpoint) as client:
            whole = await client.generate([1, 2, 3, 4], max_tokens=8, **GREEDY)
            streamed = [c async for c in client.stream([1, 2, 3, 4], max_tokens=8, **GREEDY)]
            together = await asyncio.gather(
                *(client.generate([1, 2, 3, 4], max_tokens=8, **GREEDY) for _ in range(4))
            )
            with pytest.raises(SluiceError):
                await client.generate([1, 2], max_tokens=4, top_p=0.0)
            return whole, streamed, together

    whole, streamed, together = asyncio.run(run())
    assert [t for c in streamed for t in c.token_ids] == whole.token_ids
    assert all(r.token_ids == whole.token_ids for r in together)
