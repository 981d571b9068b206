import os

import pytest
from openai import OpenAI


@pytest.fixture(scope="session")
def client() -> OpenAI:
    """The official client on `SLUICE_HTTP` (host:port of a running `sluice up`'s HTTP API)."""
    http = os.environ.get("SLUICE_HTTP")
    if not http:
        pytest.fail("set SLUICE_HTTP=host:port of a running `sluice up`'s HTTP API")
    return OpenAI(base_url=f"http://{http}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def model(client) -> str:
    return client.models.list().data[0].id
