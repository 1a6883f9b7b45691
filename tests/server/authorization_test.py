#!/usr/bin/env python3
"""The authorization matrix of docs/security.md, cell by cell, over real gRPC.

A momentum-server with a token file (alice and bob: user, vera: viewer,
root: admin, node-1: agent) and no slots, so that jobs stay
PENDING and nothing but the calls changes them. Every JobService call is
made by every caller on a job of alice's; each answer is checked against the
matrix, and a refused cancel is checked to have changed nothing.
ListJobs shows a user only its own jobs. A token file that still gives a
token the retired role "worker" is refused at start. A second server with mutual TLS
and no token file takes the client certificate's common name as the user.

usage: authorization_test.py SOURCE_DIR BINARY_DIR
"""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from python_client_test import check, generate_stubs, stop_processes  # noqa: E402
from security_test import make_pki, start  # noqa: E402

TOKENS = {
    "alice": ("alice-token-0123456789abcdef", "user"),
    "bob": ("bob-token-0123456789abcdef", "user"),
    "vera": ("vera-token-0123456789abcdef", "viewer"),
    "root": ("root-token-0123456789abcdef", "admin"),
    "node-1": ("agent-token-0123456789abcdef", "agent"),
}

SPEC = """
name: {name}
data: {{path: /nonexistent}}
optim: {{batch_size: 16}}
resources: {{nproc: 1, device: cpu}}
"""

# What each caller may do to a job of alice's (True: allowed).
#            read (get, watch, logs)  cancel  submit
MATRIX = {
    "alice": (True, True, True),
    "bob": (False, False, True),
    "vera": (True, False, False),
    "root": (True, True, True),
    "node-1": (False, False, False),
}


def main(source_dir, binary_dir):
    work = tempfile.mkdtemp(prefix="momentum-authz-")
    procs = []
    try:
        generate_stubs(source_dir, os.path.join(work, "gen"))
        import grpc
        from momentum.v1 import jobs_pb2, jobs_pb2_grpc

        with open(os.path.join(work, "tokens"), "w") as f:
            for name, (token, role) in TOKENS.items():
                f.write(f"{token} {name} {role}\n")
        # No slots: jobs stay PENDING, and only the calls change them.
        server, ready = start(binary_dir, work, "tokens",
                              [f"--token-file={work}/tokens"], slots=0)
        procs.append(server)
        stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(ready["grpc"]))

        def auth(name):
            return [("authorization", f"Bearer {TOKENS[name][0]}")]

        def code_of(call):
            try:
                call()
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

        def submit(name, who):
            return stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=SPEC.format(name=name)),
                                  timeout=10, metadata=auth(who)).job

        alices = submit("alices", "alice")
        bobs = submit("bobs", "bob")
        check(alices.owner == "alice" and bobs.owner == "bob",
              f"jobs record their owners: {alices.owner}, {bobs.owner}")
        pending = jobs_pb2.JOB_STATE_PENDING

        def state(job_id):
            return stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10,
                               metadata=auth("root")).state

        cells = 0
        for who, (read, cancel, may_submit) in MATRIX.items():
            want = {True: grpc.StatusCode.OK, False: grpc.StatusCode.PERMISSION_DENIED}
            calls = {
                "get": lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id=alices.id),
                                           timeout=10, metadata=auth(who)),
                "watch": lambda: next(iter(stub.WatchJob(
                    jobs_pb2.WatchJobRequest(job_id=alices.id), timeout=10,
                    metadata=auth(who)))),
                "logs": lambda: list(stub.GetJobLogs(
                    jobs_pb2.GetJobLogsRequest(job_id=alices.id), timeout=10,
                    metadata=auth(who))),
            }
            for what, call in calls.items():
                got = code_of(call)
                check(got == want[read], f"{who} {what} alice's job: {got.name}")
                cells += 1
            got = code_of(lambda: submit(f"by-{who}", who))
            check(got == want[may_submit], f"{who} submits: {got.name}")
            cells += 1
            if not cancel:
                got = code_of(lambda: stub.CancelJob(
                    jobs_pb2.CancelJobRequest(job_id=alices.id, reason=f"{who} did this"),
                    timeout=10, metadata=auth(who)))
                check(got == grpc.StatusCode.PERMISSION_DENIED,
                      f"{who} cancels alice's job: {got.name}")
                check(state(alices.id) == pending, f"after {who}'s cancel alice's job is PENDING")
                cells += 1
            # ListJobs: users see their own jobs, viewers and admins all,
            # agents nothing.
            try:
                listed = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=100), timeout=10,
                                       metadata=auth(who))
                owners = {job.owner for job in listed.jobs}
                role = TOKENS[who][1]
                if role == "user":
                    check(owners == {who}, f"{who} lists only its own jobs: {sorted(owners)}")
                else:
                    check(role in ("viewer", "admin") and {"alice", "bob"} <= owners,
                          f"{who} ({role}) lists every job: {sorted(owners)}")
            except grpc.RpcError as e:
                check(TOKENS[who][1] == "agent"
                      and e.code() == grpc.StatusCode.PERMISSION_DENIED,
                      f"{who} lists jobs: {e.code().name}")
            cells += 1
        # The allowed cancels last: the owner's, then an admin's of bob's.
        for who, job in (("alice", alices), ("root", bobs)):
            answer = stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id), timeout=10,
                                    metadata=auth(who)).job
            check(answer.state == jobs_pb2.JOB_STATE_CANCELLED,
                  f"{who} cancels {job.id} (of {job.owner})")
            cells += 1
        print(f"authorization matrix: {cells} cells checked")

        # Ranks have per-launch credentials now: a shared "worker" token in
        # the file is refused at start, naming the file and the line.
        with open(os.path.join(work, "old-tokens"), "w") as f:
            f.write("# before\nranks-token-0123456789abcdef ranks worker\n")
        try:
            start(binary_dir, work, "old-tokens", [f"--token-file={work}/old-tokens"], slots=0)
            check(False, "a token file with a worker role is refused")
        except RuntimeError as e:
            check(f"{work}/old-tokens:2: role worker is no longer accepted" in str(e),
                  f"a token file with a worker role is refused: {e}")

        # Mutual TLS and no token file: the client certificate's common name
        # is the user.
        pki = os.path.join(work, "pki")
        os.makedirs(pki)
        make_pki(pki, clients=("alice", "bob"))
        server, tls_ready = start(binary_dir, work, "tls", [
            f"--tls-cert={pki}/server.pem", f"--tls-key={pki}/server.key",
            f"--tls-client-ca={pki}/ca.pem"], slots=0)
        procs.append(server)
        tls_addr = tls_ready["grpc"]
        pem = lambda name: open(os.path.join(pki, name), "rb").read()  # noqa: E731

        def as_cert(name):
            return jobs_pb2_grpc.JobServiceStub(grpc.secure_channel(
                tls_addr, grpc.ssl_channel_credentials(
                    pem("ca.pem"), pem(f"{name}.key"), pem(f"{name}.pem"))))

        mine = as_cert("alice").SubmitJob(
            jobs_pb2.SubmitJobRequest(spec_yaml=SPEC.format(name="tls")), timeout=10).job
        check(mine.owner == "alice", f"the certificate's common name owns the job: {mine.owner}")
        check(code_of(lambda: as_cert("alice").GetJob(
            jobs_pb2.GetJobRequest(job_id=mine.id), timeout=10)) == grpc.StatusCode.OK,
            "alice (by certificate) reads her job")
        check(code_of(lambda: as_cert("bob").GetJob(
            jobs_pb2.GetJobRequest(job_id=mine.id), timeout=10))
            == grpc.StatusCode.PERMISSION_DENIED, "bob (by certificate) may not read it")
        check(code_of(lambda: as_cert("bob").CancelJob(
            jobs_pb2.CancelJobRequest(job_id=mine.id), timeout=10))
            == grpc.StatusCode.PERMISSION_DENIED, "bob (by certificate) may not cancel it")
        listed = as_cert("bob").ListJobs(jobs_pb2.ListJobsRequest(), timeout=10)
        check(len(listed.jobs) == 0, f"bob (by certificate) lists no job of alice's: "
              f"{[j.id for j in listed.jobs]}")
        return 0
    finally:
        stop_processes(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
