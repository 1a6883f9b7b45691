#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>)
that are binary: framed protobuf sequences (tests/fuzz/frames.h), tiny IDX,
PNG and JPEG files and a checkpoint-shaped pickle. Run with the project's
virtual environment (protobuf, grpcio-tools, Pillow, torch) from anywhere;
the outputs are checked in, so this runs only when a seed should change:

    .venv/bin/python tests/fuzz/make_seeds.py [TARGET ...]

The text seeds (job_spec, submit, token_file, path_confinement) are written
by hand. checkpoint/overread_central_dir.pt is not written here: it is the
input the checkpoint target found LibTorch's VectorReader over-reading with,
kept as a regression seed.
"""
import gzip
import io
import pathlib
import struct
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CORPUS = HERE / "corpus"


def write(target, name, data):
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def frames(*messages):
    out = b""
    for m in messages:
        data = m if isinstance(m, bytes) else m.SerializeToString()
        out += struct.pack("<H", len(data)) + data
    return out


def protos():
    """Compiles proto/momentum/v1/*.proto for Python into a temp folder."""
    from grpc_tools import protoc
    import grpc_tools
    out = tempfile.mkdtemp()
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    for proto in ("momentum/v1/jobs.proto", "momentum/v1/internal.proto"):
        if protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
                        f"--python_out={out}", proto]) != 0:
            sys.exit(f"protoc failed on {proto}")
    sys.path.insert(0, out)
    from momentum.v1 import internal_pb2, jobs_pb2
    return jobs_pb2, internal_pb2


def agent_messages(jobs, internal):
    M = internal.AgentMessage
    hello = M(hello=internal.AgentHello(hostname="node-1",
                                        advertise_address="10.0.0.2",
                                        slots=4, agent_id="a1"))

    def out(rank, *lines, job="job-1", attempt=1):
        return M(output=internal.RankOutput(job_id=job, attempt=attempt,
                                            rank=rank, lines=list(lines)))

    def exited(rank, code=0, signal=0, job="job-1", attempt=1):
        return M(exited=internal.RankExited(job_id=job, attempt=attempt,
                                            rank=rank, exit_code=code,
                                            signal=signal))
    write("agent_messages", "success.bin", frames(
        hello, out(0, "epoch 1 step 10"), out(1, "epoch 1 step 10"),
        exited(0), exited(1)))
    write("agent_messages", "crash_restart.bin", frames(
        hello, out(1, "Traceback", "RuntimeError: boom"), exited(1, 1),
        exited(0, -1, 15), out(0, "after restart", attempt=2),
        exited(0, attempt=2), exited(1, attempt=2)))
    write("agent_messages", "foreign_ranks.bin", frames(
        hello, out(7, "not mine"), out(0, "x", job="../../etc"),
        exited(0, job="job-2"), exited(0), exited(0), out(0, "late")))
    write("agent_messages", "gpus_heartbeat.bin", frames(
        M(hello=internal.AgentHello(hostname="gpu-node",
                                    advertise_address="gpu-node:0",
                                    slots=1, gpus=[0, 1, 3])),
        M(heartbeat={"seconds": 1800000000}),
        M(started=internal.RankStarted()), out(0, ""), exited(1, 137, 9)))


def worker_reports(jobs, internal):
    R = internal.WorkerReport

    def hello(rank, attempt=1, job="job-1"):
        return R(hello=internal.WorkerHello(job_id=job, attempt=attempt,
                                            rank=rank))

    def metric(step, **kw):
        fields = dict(step=step, epoch=step / 100, fraction=step / 1000,
                      loss=5.0, learning_rate=0.03, images_per_second=1200)
        fields.update(kw)
        return R(metric=jobs.MetricSample(**fields))
    beat = R(heartbeat={"seconds": 1800000001})
    summary = R(summary=internal.RunSummary(
        steps=1000, images_seen=32000, epochs_completed=10, knn_top1=0.71,
        export_path="/runs/fuzz/export.pt", stop_reason="epochs",
        train_seconds=600))
    write("worker_reports", "two_ranks.bin", frames(
        hello(0), metric(10), beat, hello(1), metric(10), beat, hello(0),
        metric(20), summary, hello(1), summary))
    write("worker_reports", "straggler.bin", frames(
        hello(0), metric(10), metric(50), metric(90), hello(1), metric(10),
        beat, beat, hello(0), metric(130), beat))
    write("worker_reports", "others.bin", frames(
        metric(1), hello(5), metric(1), hello(0, attempt=9), summary,
        hello(0, job="job-404"), beat, hello(-1), metric(-5)))
    write("worker_reports", "odd_values.bin", frames(
        hello(0), metric(2**62, loss=float("nan")),
        R(metric=jobs.MetricSample(fraction=float("inf"),
                                   epoch=-1e308)),
        R(summary=internal.RunSummary(knn_top1=float("nan"), steps=-1))))


def client_render(jobs, internal):
    J = jobs.Job
    running = J(id="job-3", name="fashion-mnist", state=jobs.JOB_STATE_RUNNING,
                priority=1, world_size=2, output_dir="/runs/job-3",
                submit_time={"seconds": 1799999000},
                start_time={"seconds": 1799999100}, restarts=1,
                progress=jobs.JobProgress(epoch=3.2, step=700, fraction=0.32,
                                          loss=4.81, images_per_second=1250,
                                          eta_seconds=185, knn_top1=0.713))
    E = jobs.WatchJobEvent
    done = J()
    done.CopyFrom(running)
    done.state = jobs.JOB_STATE_SUCCEEDED
    done.end_time.seconds = 1800000000
    write("client_render", "watch_success.bin", frames(
        running, E(job=running),
        E(metric=jobs.MetricSample(step=800, epoch=3.6, fraction=0.36,
                                   loss=4.5, images_per_second=1300)),
        E(log=jobs.LogLine(rank=0, line_number=3, text="epoch 3 done")),
        E(state_change=jobs.StateChange(
            **{"from": jobs.JOB_STATE_RUNNING}, to=jobs.JOB_STATE_SUCCEEDED,
            reason="training finished")),
        E(job=done)))
    pending = J(id="job-4", name="queued", state=jobs.JOB_STATE_PENDING,
                queue_position=2, submit_time={"seconds": 1799999990},
                progress=jobs.JobProgress(eta_seconds=-1, knn_top1=-1))
    write("client_render", "pending_cancelled.bin", frames(
        pending, E(job=pending),
        E(notice=jobs.Notice(kind="straggler", rank=1, message="slow")),
        E(state_change=jobs.StateChange(to=jobs.JOB_STATE_CANCELLED,
                                        reason="cancelled by\nrequest"))))
    odd = J(id="job-5\x1b[2J", name="tab\tname", state=99,
            progress=jobs.JobProgress(step=1, fraction=float("nan"),
                                      eta_seconds=1e300, knn_top1=2.0))
    write("client_render", "odd_values.bin", frames(
        odd, E(job=odd), E(metric=jobs.MetricSample(step=2, epoch=1e308))))


def idx():
    """Tiny Fashion-MNIST files: 3 images of 4x3 and their labels."""
    pixels = bytes(range(0, 36 * 7, 7))
    images = struct.pack(">IIII", 2051, 3, 4, 3) + pixels
    labels = struct.pack(">II", 2049, 3) + bytes([0, 9, 4])
    write("idx", "raw.bin", frames(images, labels))
    write("idx", "gzip.bin", frames(gzip.compress(images, mtime=0),
                                    gzip.compress(labels, mtime=0)))
    write("idx", "truncated.bin", frames(images[:-5], labels))
    write("idx", "bad_label.bin", frames(images, labels[:-1] + b"\x0a"))
    write("idx", "empty_set.bin", frames(struct.pack(">IIII", 2051, 0, 28, 28),
                                         struct.pack(">II", 2049, 0)))


def image_bytes(image, **save):
    out = io.BytesIO()
    image.save(out, **save)
    return out.getvalue()


def test_image(mode, size=(5, 4)):
    from PIL import Image
    image = Image.new("RGB", size)
    image.putdata([(x * 50, y * 60, (x + y) * 20)
                   for y in range(size[1]) for x in range(size[0])])
    return image.convert(mode)


# The first byte of an image seed is the target's mode (tests/fuzz/
# image_fuzz.cc): 0 header only, 1..8 a DCT scale of n/8, 9 full size.
FULL, HEADER, HALF = b"\x09", b"\x00", b"\x04"


def png():
    write("png", "rgb.png", FULL + image_bytes(test_image("RGB"), format="PNG"))
    write("png", "gray.png", FULL + image_bytes(test_image("L"), format="PNG"))
    write("png", "palette.png",
          FULL + image_bytes(test_image("P"), format="PNG"))
    write("png", "rgba.png", FULL + image_bytes(test_image("RGBA"), format="PNG"))
    write("png", "gray_alpha.png",
          FULL + image_bytes(test_image("LA"), format="PNG"))
    write("png", "gray16.png",
          FULL + image_bytes(test_image("I;16"), format="PNG"))
    write("png", "bilevel.png",
          FULL + image_bytes(test_image("1"), format="PNG"))
    write("png", "header_only.png",
          HEADER + image_bytes(test_image("RGB"), format="PNG"))
    write("png", "truncated.png",
          FULL + image_bytes(test_image("RGB"), format="PNG")[:40])


def jpeg():
    rgb = test_image("RGB", (17, 9))
    write("jpeg", "rgb.jpg", FULL + image_bytes(rgb, format="JPEG"))
    write("jpeg", "gray.jpg",
          FULL + image_bytes(rgb.convert("L"), format="JPEG"))
    write("jpeg", "cmyk.jpg",
          FULL + image_bytes(rgb.convert("CMYK"), format="JPEG"))
    write("jpeg", "progressive.jpg",
          FULL + image_bytes(rgb, format="JPEG", progressive=True))
    write("jpeg", "subsampled_half.jpg",
          HALF + image_bytes(rgb, format="JPEG", subsampling=2, quality=50))
    write("jpeg", "header_only.jpg", HEADER + image_bytes(rgb, format="JPEG"))
    write("jpeg", "truncated.jpg",
          FULL + image_bytes(rgb, format="JPEG")[:200])


def checkpoint():
    """A real checkpoint of the target's tiny model, written by the target
    (SaveCheckpoint) from a build directory's fuzz binary, and a small one
    in Python's torch.save format with the keys but another model."""
    import os
    import torch
    binary = ROOT / "build/fuzz/checkpoint_fuzz"
    if binary.exists():
        out = tempfile.mkdtemp()
        env = dict(os.environ, MOMENTUM_FUZZ_SAVE_CHECKPOINT=out,
                   ASAN_OPTIONS="detect_leaks=0")
        path = subprocess.run([str(binary)], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()
        write("checkpoint", "tiny_model.pt", pathlib.Path(path).read_bytes())
    else:
        print(f"{binary} not built (tests/fuzz/run.sh build checkpoint 0); "
              "tiny_model.pt not written", file=sys.stderr)
    state = {
        "format": "momentum-checkpoint-1", "spec": "name: other\n",
        "encoder_q": {"conv1.weight": torch.zeros(1, 1, 3, 3)},
        "encoder_k": {"conv1.weight": torch.zeros(1, 1, 3, 3)},
        "queue": torch.zeros(4, 8), "queue_ptr": 3, "sgd_momentum": [],
        "epoch": 1, "step_in_epoch": 0, "global_step": 10,
        "images_seen": 80, "train_seconds": 2.0,
        "shuffle_rng": torch.zeros(0, dtype=torch.uint8),
        "torch_rng": torch.zeros(0, dtype=torch.uint8),
        "knn_history": torch.zeros(0, 3, dtype=torch.float64),
    }
    out = io.BytesIO()
    torch.save(state, out)
    write("checkpoint", "other_model.pt", out.getvalue())
    out = io.BytesIO()
    torch.save({"format": "not-momentum"}, out)
    write("checkpoint", "not_momentum.pt", out.getvalue())


def main(targets):
    jobs = internal = None
    for target in targets:
        if target in ("agent_messages", "worker_reports", "client_render"):
            if jobs is None:
                jobs, internal = protos()
            globals()[target](jobs, internal)
        else:
            globals()[target]()


if __name__ == "__main__":
    main(sys.argv[1:] or ["agent_messages", "worker_reports", "client_render",
                          "idx", "png", "jpeg", "checkpoint"])
