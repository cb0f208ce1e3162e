#!/usr/bin/env python3
"""Deploy a signed artifact to one reload agent from Python, over the
reload.v1 gRPC API, as a deploy pipeline would:

    python3 deploy.py --host 127.0.0.1:7700 --service web --artifact ./web [--timeout 60]

The file's envelope (`./web.dsse.json`, written by `reloadctl sign`) must be
beside it. Steps: stat (skip the upload if the agent has the artifact),
upload (the envelope, then 256 KiB chunks), activate, wait until the
agent's health probe reports the service healthy, print the status.

The Python modules are generated at run time from the project's .proto
files with grpcio-tools (pip install grpcio grpcio-tools), so nothing
generated is kept in the repository. Plaintext gRPC: for an agent on
loopback with `insecure = true`; for mutual TLS pass --tls-ca, --tls-cert
and --tls-key.
"""
import argparse
import base64
import importlib
import json
import pathlib
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[2] / "proto"
CHUNK = 256 * 1024


def load_api():
    """Generates reload.v1's Python modules into a temp folder and imports them."""
    out = tempfile.mkdtemp(prefix="reload-v1-")
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "reload" / "v1").glob("*.proto"))
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
                        f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if code != 0:
        sys.exit(f"generating the reload.v1 Python code failed (protoc exit {code})")
    sys.path.insert(0, out)
    return (importlib.import_module("reload.v1.artifacts_pb2"),
            importlib.import_module("reload.v1.artifacts_pb2_grpc"),
            importlib.import_module("reload.v1.services_pb2"),
            importlib.import_module("reload.v1.services_pb2_grpc"))


def channel(args):
    if args.tls_ca:
        read = lambda p: pathlib.Path(p).read_bytes()
        creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
        return grpc.secure_channel(args.host, creds)
    return grpc.insecure_channel(args.host)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--tls-ca")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args()

    artifacts_pb2, artifacts_grpc, services_pb2, services_grpc = load_api()
    artifact = pathlib.Path(args.artifact)
    envelope = pathlib.Path(str(artifact) + ".dsse.json").read_bytes()
    manifest = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
    sha256 = manifest["sha256"]

    with channel(args) as chan:
        artifacts = artifacts_grpc.ArtifactServiceStub(chan)
        control = services_grpc.ServiceControlStub(chan)

        if artifacts.StatArtifact(artifacts_pb2.StatArtifactRequest(sha256=sha256)).present:
            print(f"{args.host}: already has {manifest['service']} {manifest['version']}")
        else:
            def messages():
                yield artifacts_pb2.UploadArtifactRequest(envelope=envelope)
                with artifact.open("rb") as f:
                    while chunk := f.read(CHUNK):
                        yield artifacts_pb2.UploadArtifactRequest(chunk=chunk)
            stored = artifacts.UploadArtifact(messages())
            print(f"{args.host}: stored {manifest['service']} {manifest['version']} ({stored.bytes_received} bytes)")

        reply = control.Activate(services_pb2.ActivateRequest(service=args.service, sha256=sha256))
        if reply.result.outcome != services_pb2.RELOAD_OUTCOME_SUCCEEDED:
            sys.exit(f"{args.host}: reload failed ({services_pb2.ReloadOutcome.Name(reply.result.outcome)}): {reply.result.reason}")
        print(f"{args.host}: activated, pid {reply.result.old_pid} -> {reply.result.new_pid}")

        deadline = time.monotonic() + args.timeout
        while True:
            status = control.GetStatus(services_pb2.GetStatusRequest(service=args.service)).services[0]
            if status.health == services_pb2.HEALTH_STATE_HEALTHY and status.pid == reply.result.new_pid:
                break
            if time.monotonic() > deadline:
                sys.exit(f"{args.host}: {args.service} not healthy within {args.timeout}s")
            time.sleep(0.2)
        print(f"{args.host}: {status.name} is healthy, version {status.current_version}, pid {status.pid}")


if __name__ == "__main__":
    main()
