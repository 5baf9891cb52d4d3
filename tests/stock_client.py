#!/usr/bin/env python3
"""A stock gRPC client that is not tonic: Python grpcio over mutual TLS, discovering the
Issuance service through server reflection (no proto files), then issuing one certificate and
checking health. Usage: stock_client.py ADDR STATE_DIR PAYLOAD_JSON_FILE. Prints the HC1."""
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

addr, state, payload_file = sys.argv[1:4]


def read(rel):
    with open(f"{state}/{rel}", "rb") as f:
        return f.read()


creds = grpc.ssl_channel_credentials(
    root_certificates=read("pki/tls/ca.pem"),
    private_key=read("pki/clients/issuer-all.key"),
    certificate_chain=read("pki/clients/issuer-all.pem"),
)
channel = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])

db = ProtoReflectionDescriptorDatabase(channel)
services = db.get_services()
assert "dccsign.v1.Issuance" in services, services
pool = descriptor_pool.DescriptorPool(db)
method = pool.FindServiceByName("dccsign.v1.Issuance").FindMethodByName("Issue")
Request = message_factory.GetMessageClass(method.input_type)
Response = message_factory.GetMessageClass(method.output_type)

with open(payload_file) as f:
    payload = f.read()
request = json_format.ParseDict(
    {"requestId": "python-1", "type": "CERTIFICATE_TYPE_VACCINATION", "payloadJson": payload}, Request()
)
issue = channel.unary_unary(
    "/dccsign.v1.Issuance/Issue",
    request_serializer=Request.SerializeToString,
    response_deserializer=Response.FromString,
)
response = issue(request, timeout=30)
assert response.request_id == "python-1", response.request_id

health = health_pb2_grpc.HealthStub(channel)
status = health.Check(health_pb2.HealthCheckRequest(service="dccsign.v1.Issuance"), timeout=10)
assert status.status == health_pb2.HealthCheckResponse.SERVING, status

# A refused request carries the stable code in the status message and details.
bad = json_format.ParseDict({"requestId": "python-2", "type": "CERTIFICATE_TYPE_VACCINATION"}, Request())
try:
    issue(bad, timeout=30)
    raise SystemExit("a request without payload was accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.code()
    assert "2-60-1001-41" in e.details(), e.details()

print(response.hc1)
