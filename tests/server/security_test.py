#!/usr/bin/env python3
"""TLS, mutual TLS, bearer tokens and path roots on the real momentum-server.

A throw-away CA (openssl) signs the server's certificate (for 127.0.0.1) and
a client certificate. The server requires client certificates and tokens;
calls with the right credentials pass, and missing or wrong ones are refused
with the right status code. A job submitted with TLS and a token trains and
its ranks report metrics over TLS with the token the server gives them.
Paths outside the server's roots are refused, symlink escapes included, and
a server without TLS refuses to listen beyond loopback. A user with a
queued job too many is refused. The plaintext health ports of the server
and of an agent answer the standard health service and nothing else.

usage: security_test.py SOURCE_DIR BINARY_DIR
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from python_client_test import (check, free_port, generate_stubs,  # noqa: E402
                                stop_processes, write_fake_fashion_mnist)

USER_TOKEN = "user-token-0123456789abcdef"
AGENT_TOKEN = "agent-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdef"

SERVING, NOT_SERVING = b"\x08\x01", b"\x08\x02"


def health_of(grpc, addr):
    """grpc.health.v1.Health/Check("") on a plaintext channel: the raw reply."""
    check_health = grpc.insecure_channel(addr).unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return check_health(b"", timeout=5)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d, clients=("client",)):
    """ca.pem, server.pem/.key (127.0.0.1), a certificate and key per name
    in `clients` (its common name), other-ca.pem."""
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", f"/CN=momentum test {ca}", "-keyout", f"{ca}.key",
                "-out", f"{ca}.pem", cwd=d)
    with open(os.path.join(d, "san.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", *clients):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey",
                "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "san.cnf",
                "-out", f"{name}.pem", cwd=d)


def start(binary_dir, work, name, extra, env=None, slots=2, worker=None):
    ready = os.path.join(work, f"{name}-ready.json")
    log = open(os.path.join(work, f"{name}.log"), "w")
    proc = subprocess.Popen(
        [os.path.join(binary_dir, "server", "momentum-server"),
         "--listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0",
         f"--state-dir={work}/{name}-state", f"--slots={slots}", "--gpus=none",
         f"--worker={worker or binary_dir + '/worker/momentum-worker'}",
         f"--ready-file={ready}", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 30
    while not os.path.exists(ready):
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{name} did not start: " +
                               open(os.path.join(work, f"{name}.log")).read())
        time.sleep(0.05)
    return proc, json.load(open(ready))


def main(source_dir, binary_dir):
    work = tempfile.mkdtemp(prefix="momentum-security-")
    procs = []
    try:
        generate_stubs(source_dir, os.path.join(work, "gen"))
        import grpc
        from momentum.v1 import internal_pb2, internal_pb2_grpc, jobs_pb2, jobs_pb2_grpc

        pki = os.path.join(work, "pki")
        os.makedirs(pki)
        make_pki(pki)
        pem = lambda name: open(os.path.join(pki, name), "rb").read()  # noqa: E731
        with open(os.path.join(work, "tokens"), "w") as f:
            f.write(f"# token name role\n{USER_TOKEN} alice user\n"
                    f"{AGENT_TOKEN} node-1 agent\n{BOB_TOKEN} bob user\n")
        data_root = os.path.join(work, "data-root")
        write_fake_fashion_mnist(os.path.join(data_root, "fm"), 64, 30)
        os.symlink("/etc", os.path.join(data_root, "escape"))

        # Ranks (the server's children) report over TLS: they inherit the CA
        # and a client certificate from the server's environment.
        env = dict(os.environ, MOMENTUM_TLS_CA=f"{pki}/ca.pem",
                   MOMENTUM_TLS_CERT=f"{pki}/client.pem",
                   MOMENTUM_TLS_KEY=f"{pki}/client.key")
        server, ready = start(binary_dir, work, "secure", [
            f"--tls-cert={pki}/server.pem", f"--tls-key={pki}/server.key",
            f"--tls-client-ca={pki}/ca.pem", f"--token-file={work}/tokens",
            f"--data-root={data_root}", f"--output-root={work}/outputs",
            "--max-ranks-per-job=2", "--max-queued-jobs-per-user=1",
            "--health-listen=127.0.0.1:0"], env=env)
        procs.append(server)
        addr = ready["grpc"]

        # The health port is plaintext, asks for no token, and serves only
        # the health service.
        check(health_of(grpc, ready["health"]) == SERVING,
              f"the plaintext health port {ready['health']} answers SERVING")
        try:
            jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(ready["health"])).ListJobs(
                jobs_pb2.ListJobsRequest(), timeout=5)
            check(False, "the health port serves no JobService")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.UNIMPLEMENTED,
                  f"the health port serves no JobService: {e.code().name}")

        def jobs(creds):
            return jobs_pb2_grpc.JobServiceStub(grpc.secure_channel(addr, creds)
                                                if creds else grpc.insecure_channel(addr))

        def code_of(call):
            try:
                call()
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

        good = grpc.ssl_channel_credentials(pem("ca.pem"), pem("client.key"), pem("client.pem"))
        no_client_cert = grpc.ssl_channel_credentials(pem("ca.pem"))
        wrong_ca = grpc.ssl_channel_credentials(pem("other-ca.pem"), pem("client.key"),
                                                pem("client.pem"))
        auth = [("authorization", f"Bearer {USER_TOKEN}")]
        listing = jobs_pb2.ListJobsRequest()

        check(code_of(lambda: jobs(None).ListJobs(listing, timeout=5, metadata=auth))
              == grpc.StatusCode.UNAVAILABLE, "plaintext to a TLS server: UNAVAILABLE")
        check(code_of(lambda: jobs(no_client_cert).ListJobs(listing, timeout=5, metadata=auth))
              == grpc.StatusCode.UNAVAILABLE, "no client certificate (mutual TLS): UNAVAILABLE")
        check(code_of(lambda: jobs(wrong_ca).ListJobs(listing, timeout=5, metadata=auth))
              == grpc.StatusCode.UNAVAILABLE, "server certificate from an unknown CA: UNAVAILABLE")
        check(code_of(lambda: jobs(good).ListJobs(listing, timeout=5))
              == grpc.StatusCode.UNAUTHENTICATED, "no token: UNAUTHENTICATED")
        check(code_of(lambda: jobs(good).ListJobs(
            listing, timeout=5, metadata=[("authorization", "Bearer wrong-token-0123456789")]))
              == grpc.StatusCode.UNAUTHENTICATED, "wrong token: UNAUTHENTICATED")
        check(code_of(lambda: jobs(good).ListJobs(listing, timeout=5, metadata=auth))
              == grpc.StatusCode.OK, "TLS, client certificate and user token: OK")
        check(code_of(lambda: jobs(good).ListJobs(
            listing, timeout=5, metadata=[("authorization", f"Bearer {AGENT_TOKEN}")]))
              == grpc.StatusCode.PERMISSION_DENIED, "an agent's token on JobService: PERMISSION_DENIED")
        internal = internal_pb2_grpc.InternalServiceStub(grpc.secure_channel(addr, good))
        hello = internal_pb2.WorkerReport(hello=internal_pb2.WorkerHello(job_id="job-1"))
        check(code_of(lambda: internal.ReportMetrics(iter([hello]), timeout=5, metadata=auth))
              == grpc.StatusCode.PERMISSION_DENIED, "a user's token on InternalService: PERMISSION_DENIED")

        specs = iter(range(1, 1000))

        def spec(path, out=None, nproc=2):
            # Each its own output_dir: live jobs may not share one.
            out = out or f"out-{next(specs)}"
            return f"""
name: secure
output_dir: {out}
model: {{width: 4, in_channels: 1, small_stem: true}}
moco: {{dim: 8, queue_size: 24}}
data: {{path: {path}, loader_threads: 1}}
optim: {{batch_size: 16, lr: 0.1, epochs: 2}}
eval: {{every_epochs: 1, knn_k: 5}}
logging: {{every_steps: 1}}
resources: {{threads: 1, nproc: {nproc}, timeout_s: 60}}
"""

        stub = jobs(good)
        for path, what in (("/etc", "a data.path outside the roots"),
                           (f"{data_root}/escape", "a symlink out of the roots"),
                           (f"{data_root}/../elsewhere", "a .. out of the roots")):
            try:
                stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec(path)), timeout=5,
                               metadata=auth)
                check(False, f"{what} is refused")
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.PERMISSION_DENIED and "data.path" in e.details(),
                      f"{what} is refused: {e.code().name}: {e.details()}")
        for out, what in (("/tmp/momentum-anywhere", "an absolute output_dir outside the roots"),
                          ("../../escape", "a relative output_dir that climbs out")):
            try:
                stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec(f"{data_root}/fm", out)),
                               timeout=5, metadata=auth)
                check(False, f"{what} is refused")
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.PERMISSION_DENIED and "output_dir" in e.details(),
                      f"{what} is refused: {e.details()}")
        try:
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec(f"{data_root}/fm", nproc=4)),
                           timeout=5, metadata=auth)
            check(False, "too many ranks are refused")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.INVALID_ARGUMENT and "resources.nproc" in e.details(),
                  f"too many ranks are refused: {e.details()}")

        job = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec(f"{data_root}/fm")),
                             timeout=5, metadata=auth).job
        check(job.owner == "alice", f"the job records who submitted it: {job.owner!r}")

        # Queued jobs per user: with the job running on both slots, alice may
        # queue one more, not two; bob has a place of his own.
        deadline = time.time() + 60
        while stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=5,
                          metadata=auth).state != jobs_pb2.JOB_STATE_RUNNING:
            check(time.time() < deadline, f"{job.id} starts")
            time.sleep(0.1)
        queued = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec(f"{data_root}/fm")),
                                timeout=5, metadata=auth).job
        check(queued.state == jobs_pb2.JOB_STATE_PENDING, f"alice queues {queued.id}")
        try:
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec(f"{data_root}/fm")),
                           timeout=5, metadata=auth)
            check(False, "a second queued job of alice's is refused")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "alice" in e.details(),
                  f"a second queued job of alice's is refused: {e.code().name}: {e.details()}")
        bob = [("authorization", f"Bearer {BOB_TOKEN}")]
        bobs = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec(f"{data_root}/fm")),
                              timeout=5, metadata=bob).job
        check(bobs.owner == "bob" and bobs.state == jobs_pb2.JOB_STATE_PENDING,
              f"bob queues {bobs.id} all the same")
        for queued_id, who in ((queued.id, auth), (bobs.id, bob)):
            stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=queued_id), timeout=5, metadata=who)
        metrics, final = 0, None
        for event in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id, metrics=True),
                                   timeout=300, metadata=auth):
            if event.WhichOneof("event") == "metric":
                metrics += 1
            elif event.WhichOneof("event") == "job":
                final = event.job
        check(final.state == jobs_pb2.JOB_STATE_SUCCEEDED,
              f"a job over TLS with a token succeeds ({final.state_reason})")
        check(metrics > 0, f"its ranks reported {metrics} samples over TLS with their token")

        # The momentum client with the same credentials, and without a token.
        with open(os.path.join(work, "token"), "w") as f:
            f.write(USER_TOKEN + "\n")
        cli = [os.path.join(binary_dir, "client", "momentum"), "--server", addr,
               "--tls-ca", f"{pki}/ca.pem", "--tls-cert", f"{pki}/client.pem",
               "--tls-key", f"{pki}/client.key"]
        ok = subprocess.run(cli + ["--token-file", f"{work}/token", "get", job.id],
                            capture_output=True, text=True, timeout=30)
        check(ok.returncode == 0 and "SUCCEEDED" in ok.stdout,
              "momentum get over mutual TLS with a token file works")
        bare_env = {k: v for k, v in os.environ.items() if not k.startswith("MOMENTUM_")}
        denied = subprocess.run(cli + ["list"], capture_output=True, text=True, timeout=30,
                                env=bare_env)
        check(denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr,
              f"momentum list without a token: {denied.stderr.strip()}")

        # An agent's health port: SERVING once the coordinator took it in;
        # an agent the coordinator refuses (wrong token) stays NOT_SERVING.
        agents = {}
        for name, token in (("good", AGENT_TOKEN), ("refused", "not-a-token")):
            with open(os.path.join(work, f"{name}-agent-token"), "w") as f:
                f.write(token + "\n")
            health_addr = f"127.0.0.1:{free_port()}"
            agent = subprocess.Popen(
                [os.path.join(binary_dir, "server", "momentum-agent"), "--server", addr,
                 "--slots=1", "--gpus=none", f"--work-dir={work}/{name}-agent",
                 f"--tls-ca={pki}/ca.pem", f"--tls-cert={pki}/client.pem",
                 f"--tls-key={pki}/client.key",
                 f"--token-file={work}/{name}-agent-token",
                 f"--health-listen={health_addr}"],
                stdout=open(os.path.join(work, f"{name}-agent.log"), "w"),
                stderr=subprocess.STDOUT)
            procs.append(agent)
            agents[name] = health_addr
        deadline, status = time.time() + 30, None
        while status != SERVING and time.time() < deadline:
            try:
                status = health_of(grpc, agents["good"])
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        check(status == SERVING, "an agent the coordinator took in answers SERVING" + (
            "" if status == SERVING else
            ": " + open(os.path.join(work, "good-agent.log")).read()))
        refused_log = os.path.join(work, "refused-agent.log")
        while "did not welcome" not in open(refused_log).read() and time.time() < deadline:
            time.sleep(0.1)
        check("unknown token" in open(refused_log).read(),
              "the coordinator refuses an agent with a wrong token")
        check(health_of(grpc, agents["refused"]) == NOT_SERVING,
              "an agent with a wrong token answers NOT_SERVING")

        # No TLS: loopback only.
        plain = subprocess.run(
            [os.path.join(binary_dir, "server", "momentum-server"), "--listen=0.0.0.0:0",
             "--metrics-listen=127.0.0.1:0", f"--state-dir={work}/plain-state"],
            capture_output=True, text=True, timeout=30)
        check(plain.returncode == 2 and "loopback only" in plain.stderr,
              f"without TLS the server refuses 0.0.0.0: {plain.stderr.strip()}")
        return 0
    finally:
        stop_processes(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
