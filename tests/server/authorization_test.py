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

Outputs are confined (docs/security.md): each user's relative output_dir
lives in a folder of its own, an absolute one (also through a symlink) must
lie under the user's roots, no two live jobs share an output, no job writes
into another owner's, and the check is made again at launch: a third server
with one slot and a fake worker (a shell script) sees a queued job's folder
swapped for a symlink into bob's. Invalid job ids are INVALID_ARGUMENT.

usage: authorization_test.py SOURCE_DIR BINARY_DIR
"""

import os
import shutil
import sys
import tempfile
import time

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
output_dir: {name}
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
        outputs = os.path.join(os.path.realpath(work), "outputs")
        server, ready = start(binary_dir, work, "tokens",
                              [f"--token-file={work}/tokens", f"--output-root={outputs}"],
                              slots=0)
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
        # Outputs. Every cell is checked and the failures listed at the end.
        failures = []

        def expect(cond, what):
            print(("ok: " if cond else "FAILED: ") + what)
            if not cond:
                failures.append(what)

        def refused(spec_yaml, who, code, *words):
            """Whether submitting is refused with `code` and a message holding
            `words`; the answer's text."""
            try:
                job = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=spec_yaml),
                                     timeout=10, metadata=auth(who)).job
                return False, f"accepted as {job.id} writing to {job.output_dir}"
            except grpc.RpcError as e:
                return (e.code() == code and all(w in e.details() for w in words),
                        f"{e.code().name}: {e.details()}")

        def out_spec(name, out):
            return SPEC.replace(f"output_dir: {{name}}", f"output_dir: {out}").format(name=name)

        def stored():
            return stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=1), timeout=10,
                                 metadata=auth("root")).total_size

        alices_out = f"{outputs}/alice/alices"
        expect(alices.output_dir == alices_out,
               f"alice's relative output_dir lives in her folder: {alices.output_dir}")
        before = stored()
        denied = grpc.StatusCode.PERMISSION_DENIED
        os.makedirs(f"{outputs}/bob", exist_ok=True)
        os.symlink(f"{outputs}/alice", f"{outputs}/bob/to-alice")
        for out, what in (("../alice/alices", "a relative path out of his folder"),
                          (alices_out, "her output_dir, absolute"),
                          (f"{outputs}/alice", "her whole folder"),
                          ("to-alice/alices", "a symlink in his folder to hers"),
                          (f"{outputs}/bob/to-alice/alices", "that symlink, absolute")):
            ok, answer = refused(out_spec("bobs-theft", out), "bob", denied, "output_dir")
            expect(ok, f"bob may not write into alice's output via {what} ({out}): {answer}")
        ok, answer = refused(out_spec("bobs-theft", "to-alice/alices"), "bob", denied,
                             f"resolves to {alices_out}")
        expect(ok, f"the refusal names where the symlink leads: {answer}")
        expect(stored() == before, f"nothing of bob's refused jobs is stored ({stored()} jobs, "
               f"{before} before)")
        in_use = grpc.StatusCode.FAILED_PRECONDITION
        for out, how in (("alices", "is"), (f"{alices_out}/sub", "lies inside"),
                         (outputs + "/alice", "contains")):
            ok, answer = refused(out_spec("alices-twin", out), "alice", in_use,
                                 "output_dir", f"{how} the output of {alices.id} (PENDING)")
            expect(ok, f"alice's second live job may not share her first's output "
                   f"({out}): {answer}")
        expect(stored() == before, "nothing of alice's refused jobs is stored")

        # Job ids from peers name no file and no row unless they are job-<n>.
        bad_id = grpc.StatusCode.INVALID_ARGUMENT
        for what, call in (
                ("GetJob", lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id=f"{alices.id}/../x"),
                                               timeout=10, metadata=auth("alice"))),
                ("CancelJob", lambda: stub.CancelJob(jobs_pb2.CancelJobRequest(job_id="../job-1"),
                                                     timeout=10, metadata=auth("alice"))),
                ("WatchJob", lambda: next(iter(stub.WatchJob(
                    jobs_pb2.WatchJobRequest(job_id="job-1a"), timeout=10,
                    metadata=auth("root"))))),
                ("GetJobLogs", lambda: list(stub.GetJobLogs(
                    jobs_pb2.GetJobLogsRequest(job_id="job-"), timeout=10,
                    metadata=auth("root"))))):
            try:
                call()
                expect(False, f"{what} with an invalid job_id: OK")
            except grpc.RpcError as e:
                expect(e.code() == bad_id and "job_id" in e.details(),
                       f"{what} with an invalid job_id: {e.code().name}: {e.details()}")
        # (A rank's WorkerHello is checked too, but only a live rank's own
        # credential may send one: it has no cell here.)

        # The allowed cancels last: the owner's, then an admin's of bob's.
        for who, job in (("alice", alices), ("root", bobs)):
            answer = stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id), timeout=10,
                                    metadata=auth(who)).job
            check(answer.state == jobs_pb2.JOB_STATE_CANCELLED,
                  f"{who} cancels {job.id} (of {job.owner})")
            cells += 1
        print(f"authorization matrix: {cells} cells checked")

        # Ended jobs: their owner may write there again (and resume from
        # them); nobody else may, not even an admin.
        try:
            again = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=SPEC.format(name="alices")),
                                   timeout=10, metadata=auth("alice")).job
            expect(again.output_dir == alices_out,
                   f"alice resubmits her output_dir after {alices.id} ended: {again.id} "
                   f"writes to {again.output_dir}")
        except grpc.RpcError as e:
            expect(False, f"alice resubmits her output_dir after {alices.id} ended: "
                   f"{e.code().name}: {e.details()}")
        ok, answer = refused(out_spec("roots", f"{outputs}/bob/bobs"), "root", in_use,
                             f"the output of {bobs.id} (CANCELLED, submitted by bob)")
        expect(ok, f"an admin may not write into bob's ended job's output: {answer}")
        try:
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=SPEC.format(name="bobs")),
                           timeout=10, metadata=auth("bob"))
            expect(True, "bob resubmits his own ended job's output_dir")
        except grpc.RpcError as e:
            expect(False, f"bob resubmits his own ended job's output_dir: {e.details()}")

        # At launch: one slot, held by alice's first job (a fake worker that
        # waits for a file); her second, queued, has its folder swapped for
        # a symlink into bob's before it launches.
        worker = os.path.join(work, "fake-worker.sh")
        with open(worker, "w") as f:
            f.write(f"#!/bin/sh\ntouch {work}/ran-$MOMENTUM_JOB_ID\n"
                    f"while [ ! -e {work}/release ]; do sleep 0.05; done\n")
        os.chmod(worker, 0o755)
        launch_outputs = os.path.join(os.path.realpath(work), "launch-outputs")
        server, launch_ready = start(binary_dir, work, "launch", [
            f"--token-file={work}/tokens", f"--output-root={launch_outputs}"],
            slots=1, worker=worker)
        procs.append(server)
        launch = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(launch_ready["grpc"]))

        def wait_for(job_id, states, timeout=30):
            deadline = time.time() + timeout
            while True:
                job = launch.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10,
                                    metadata=auth("alice"))
                if job.state in states or time.time() > deadline:
                    return job
                time.sleep(0.05)

        first = launch.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=SPEC.format(name="first")),
                                 timeout=10, metadata=auth("alice")).job
        expect(wait_for(first.id, [jobs_pb2.JOB_STATE_RUNNING]).state == jobs_pb2.JOB_STATE_RUNNING,
               f"alice's {first.id} runs on the one slot")
        queued = launch.SubmitJob(jobs_pb2.SubmitJobRequest(spec_yaml=SPEC.format(name="swapped")),
                                  timeout=10, metadata=auth("alice")).job
        bobs_dir = f"{launch_outputs}/bob/x"
        os.makedirs(bobs_dir)
        os.makedirs(f"{launch_outputs}/alice", exist_ok=True)
        os.symlink(bobs_dir, f"{launch_outputs}/alice/swapped")
        open(os.path.join(work, "release"), "w").close()
        final = wait_for(queued.id, [jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED,
                                     jobs_pb2.JOB_STATE_CANCELLED])
        expect(final.state == jobs_pb2.JOB_STATE_FAILED and "output_dir" in final.state_reason
               and f"resolves to {bobs_dir}" in final.state_reason and final.restarts == 0,
               f"a folder swapped for a symlink into bob's fails the job at launch: "
               f"{jobs_pb2.JobState.Name(final.state)}: {final.state_reason}")
        expect(not os.path.exists(f"{work}/ran-{queued.id}") and os.listdir(bobs_dir) == [],
               f"no rank of {queued.id} started and nothing was written in bob's folder")
        expect(os.path.exists(f"{work}/ran-{first.id}"), f"the rank of {first.id} did start")

        # A root of alice's own besides her folder (--user-output-root).
        scratch = os.path.join(os.path.realpath(work), "scratch-alice")
        os.makedirs(scratch)
        try:
            server, roots_ready = start(binary_dir, work, "roots", [
                f"--token-file={work}/tokens", f"--output-root={outputs}",
                f"--user-output-root=alice={scratch}"], slots=0)
            procs.append(server)
            roots = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(roots_ready["grpc"]))
            mine = roots.SubmitJob(jobs_pb2.SubmitJobRequest(
                spec_yaml=out_spec("scratch", f"{scratch}/run")), timeout=10,
                metadata=auth("alice")).job
            expect(mine.output_dir == f"{scratch}/run", f"alice writes under her root: "
                   f"{mine.output_dir}")
            try:
                roots.SubmitJob(jobs_pb2.SubmitJobRequest(
                    spec_yaml=out_spec("scratch", f"{scratch}/bobs")), timeout=10,
                    metadata=auth("bob"))
                expect(False, "bob may not write under alice's root")
            except grpc.RpcError as e:
                expect(e.code() == denied and "output_dir" in e.details(),
                       f"bob may not write under alice's root: {e.details()}")
        except RuntimeError as e:
            expect(False, f"a server with --user-output-root: {e}")
        check(not failures, f"output confinement: {len(failures)} cells failed")

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
