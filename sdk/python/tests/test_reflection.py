"""Reflection as a third-party client sees it (grpcio-reflection, no generated code of ours),
and the ghz configs in deploy/ghz resolved and sent through it."""

import json
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

GHZ = Path(__file__).resolve().parents[3] / "deploy" / "ghz"


class Reflected:
    """Message classes and calls built only from what the server's reflection says."""

    def __init__(self, channel):
        self.channel = channel
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def services(self):
        return set(self.database.get_services())

    def method(self, call: str):
        # ghz names a call `package.Service.Method` (or `package.Service/Method`).
        service, _, name = call.replace("/", ".").rpartition(".")
        return self.pool.FindServiceByName(service).FindMethodByName(name)

    def invoke(self, call: str, body: dict):
        m = self.method(call)
        request_class = message_factory.GetMessageClass(m.input_type)
        response_class = message_factory.GetMessageClass(m.output_type)
        request = json_format.ParseDict(body, request_class())
        path = f"/{m.containing_service.full_name}/{m.name}"
        kwargs = dict(request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString)
        if m.server_streaming:
            return list(self.channel.unary_stream(path, **kwargs)(request, timeout=120))
        return [self.channel.unary_unary(path, **kwargs)(request, timeout=120)]


def test_reflection_lists_the_public_api(endpoint):
    with grpc.insecure_channel(endpoint) as channel:
        r = Reflected(channel)
        services = r.services()
        assert "sluice.v1.Inference" in services
        assert "grpc.health.v1.Health" in services
        stream = r.method("sluice.v1.Inference.GenerateStream")
        assert stream.server_streaming and not stream.client_streaming
        assert stream.input_type.full_name == "sluice.v1.GenerateRequest"
        sampling = stream.input_type.fields_by_name["sampling"].message_type
        assert {"max_tokens", "temperature", "seed", "stop"} <= set(sampling.fields_by_name)


def test_ghz_configs_resolve_and_every_prompt_is_accepted(endpoint):
    prompts = json.loads((GHZ / "prompts.json").read_text())
    assert prompts
    configs = sorted(GHZ.glob("*.json"))
    calls = []
    for path in configs:
        config = json.loads(path.read_text())
        if "call" not in config:
            continue
        assert config["insecure"] is True, path
        assert (GHZ / config["data-file"]).exists(), path
        calls.append(config["call"])
    assert sorted(calls) == ["sluice.v1.Inference.Generate", "sluice.v1.Inference.GenerateStream"]
    with grpc.insecure_channel(endpoint) as channel:
        r = Reflected(channel)
        for call in calls:
            for body in prompts:
                # Keep CI quick: the same request, shortened.
                body = json.loads(json.dumps(body))
                body["sampling"]["max_tokens"] = 2
                replies = r.invoke(call, body)
                tokens = [t for reply in replies for t in reply.token_ids]
                assert len(tokens) == 2, (call, body, replies)
