import os

import pytest


@pytest.fixture(scope="session")
def endpoint() -> str:
    """The router under test: `SLUICE_ENDPOINT` (host:port) of a running `sluice up`."""
    value = os.environ.get("SLUICE_ENDPOINT")
    if not value:
        pytest.fail("set SLUICE_ENDPOINT=host:port of a running `sluice up` (see sdk/python/README.md)")
    return value.removeprefix("http://")
