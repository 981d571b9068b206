"""The API key: sent as `authorization: Bearer KEY` on every call, and a router's
UNAUTHENTICATED raised as `Unauthenticated`. Checked against a stand-in server of our own
that admits exactly one key (the CI router runs without keys)."""

from concurrent import futures

import grpc
import pytest

from sluice_client import Client, Unauthenticated
from sluice_client._proto import inference_pb2 as pb
from sluice_client._proto import inference_pb2_grpc as pb_grpc

KEY = "ops-0123456789abcdef"


class OneKey(pb_grpc.InferenceServicer):
    def __init__(self):
        self.seen = []

    def _check(self, context):
        auth = dict(context.invocation_metadata()).get("authorization")
        self.seen.append(auth)
        if auth != f"Bearer {KEY}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")

    def Generate(self, request, context):
        self._check(context)
        return pb.GenerateResponse(token_ids=[7, 8], text="ok")

    def ListModels(self, request, context):
        self._check(context)
        return pb.ListModelsResponse()


@pytest.fixture
def one_key_server():
    servicer = OneKey()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_the_key_is_sent_and_a_refusal_is_typed(one_key_server):
    endpoint, servicer = one_key_server
    with Client(endpoint, api_key=KEY) as c:
        assert c.generate("hi").token_ids == [7, 8]
        assert c.models() == []
    with Client(endpoint) as c, pytest.raises(Unauthenticated):
        c.generate("hi")
    with Client(endpoint, api_key="wrong-0123456789") as c, pytest.raises(Unauthenticated):
        c.models()
    assert servicer.seen == [f"Bearer {KEY}", f"Bearer {KEY}", None, "Bearer wrong-0123456789"]
