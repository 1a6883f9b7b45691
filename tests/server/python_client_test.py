#!/usr/bin/env python3
"""A client written in Python with grpcio (the project's virtual environment)
submits and watches a job on the real momentum-server: the API is usable
outside C++.

Stubs are generated here from proto/momentum/v1/*.proto with grpc_tools
(grpcio-tools). The health service (grpc.health.v1) and server
reflection are called by method name with hand-encoded messages, as any
generic gRPC tool does.

usage: python_client_test.py SOURCE_DIR BINARY_DIR
"""

import gzip
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc


def generate_stubs(source_dir, out_dir):
    proto_dir = os.path.join(source_dir, "proto")
    os.makedirs(out_dir, exist_ok=True)
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            "momentum/v1/jobs.proto", "momentum/v1/internal.proto"]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/momentum/v1")
    for d in ("momentum", "momentum/v1"):
        open(os.path.join(out_dir, d, "__init__.py"), "a").close()
    sys.path.insert(0, out_dir)


def write_fake_fashion_mnist(path, train, test, size=12):
    """IDX files as in Fashion-MNIST, gzipped, with random pixels."""
    os.makedirs(path)
    import random
    rng = random.Random(7)
    for prefix, n in (("train", train), ("t10k", test)):
        images = struct.pack(">IIII", 0x803, n, size, size) + bytes(
            rng.randrange(256) for _ in range(n * size * size))
        labels = struct.pack(">II", 0x801, n) + bytes(i % 10 for i in range(n))
        with gzip.open(os.path.join(path, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(images)
        with gzip.open(os.path.join(path, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(labels)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(binary_dir, work):
    ready = os.path.join(work, "ready.json")
    log = open(os.path.join(work, "server.log"), "w")
    proc = subprocess.Popen(
        [os.path.join(binary_dir, "server", "momentum-server"),
         "--listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0",
         f"--state-dir={work}/state", "--slots=2",
         # CPU jobs on any machine: no GPU is offered.
         "--gpus=none",
         f"--worker={binary_dir}/worker/momentum-worker",
         f"--ready-file={ready}"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while not os.path.exists(ready):
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError("momentum-server did not start: " +
                               open(os.path.join(work, "server.log")).read())
        time.sleep(0.05)
    return proc, json.load(open(ready))


def stop_processes(procs):
    """SIGTERM each, then wait (SIGKILL after 30 s)."""
    for p in procs:
        if p is None:
            continue
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_watchers(stub, pb, job_id, n):
    """n WatchJob streams (metrics and logs) on threads; returns (calls,
    received), received[i] counting the events of stream i."""
    import grpc
    import threading
    calls, received = [], [0] * n

    def watch(i):
        call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id, metrics=True, logs=True))
        calls.append(call)
        try:
            for _ in call:
                received[i] += 1
        except grpc.RpcError:
            pass

    for i in range(n):
        threading.Thread(target=watch, args=(i,), daemon=True).start()
    return calls, received


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


def main(source_dir, binary_dir):
    work = tempfile.mkdtemp(prefix="momentum-pyclient-")
    proc = None
    try:
        generate_stubs(source_dir, os.path.join(work, "gen"))
        from momentum.v1 import jobs_pb2, jobs_pb2_grpc  # noqa: E402

        write_fake_fashion_mnist(os.path.join(work, "data"), 64, 30)
        proc, ready = start_server(binary_dir, work)
        channel = grpc.insecure_channel(ready["grpc"])
        stub = jobs_pb2_grpc.JobServiceStub(channel)

        # Health: grpc.health.v1.Health/Check with service "" -> SERVING (1).
        check_health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        check(check_health(b"", timeout=10) == b"\x08\x01",
              "health service answers SERVING")

        # Reflection lists our services (list_services = field 7, "").
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        answer = b"".join(reflect(iter([b"\x3a\x00"]), timeout=10))
        check(b"momentum.v1.JobService" in answer and b"momentum.v1.InternalService" in answer,
              "server reflection lists momentum.v1.JobService and InternalService")

        spec = f"""
name: from-python
seed: 2
output_dir: out
model: {{width: 4, in_channels: 1, small_stem: true}}
moco: {{dim: 8, queue_size: 24}}
data: {{path: {work}/data, loader_threads: 1}}
optim: {{batch_size: 16, lr: 0.1, epochs: 2}}
eval: {{every_epochs: 1, knn_k: 5}}
logging: {{every_steps: 1}}
resources: {{threads: 1, nproc: 2, timeout_s: 60}}
"""
        try:
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec, overrides=["optim.lr=0"]),
                           timeout=10)
            check(False, "a bad override is refused")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "optim.lr" in e.details(),
                  f"a bad override is refused with INVALID_ARGUMENT naming the field ({e.details()})")

        job = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec), timeout=10).job
        check(job.state == jobs_pb2.JOB_STATE_PENDING and job.world_size == 2,
              f"submitted {job.id} PENDING with 2 ranks")

        states, metrics, final = [], 0, None
        for event in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id, metrics=True),
                                   timeout=300):
            kind = event.WhichOneof("event")
            if kind == "state_change":
                states.append(jobs_pb2.JobState.Name(event.state_change.to))
            elif kind == "metric":
                metrics += 1
            elif kind == "job":
                final = event.job
        check(states[-1] == "JOB_STATE_SUCCEEDED",
              f"watched to SUCCEEDED through {states}")
        check(final is not None and final.state == jobs_pb2.JOB_STATE_SUCCEEDED
              and final.progress.knn_top1 >= 0 and os.path.exists(final.export_path),
              f"final snapshot: kNN top-1 {final.progress.knn_top1:.3f}, export {final.export_path}")
        listed = stub.ListJobs(jobs_pb2.ListJobsRequest(name_contains="python"), timeout=10)
        check([j.id for j in listed.jobs] == [job.id], "ListJobs filters by name")
        print(f"metric samples streamed: {metrics}")
        return 0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
