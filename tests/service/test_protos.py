"""The checked-in stubs match the .proto, and the .proto alone is enough to write a client."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from grpc_support import sample_images, start_server

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "proto" / "gradprobe" / "v1" / "reliability.proto"


def test_checked_in_stubs_match_the_proto():
    result = subprocess.run(
        [sys.executable, "-m", "service.protos", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_check_reports_drift_clearly(tmp_path):
    from service import protos

    stale = tmp_path / "stubs"
    protos.generate(stale)
    (stale / "gradprobe" / "v1" / "reliability_pb2.py").write_text("# edited by hand\n")
    (stale / "gradprobe" / "v1" / "leftover_pb2.py").write_text("")
    assert protos.drift(stale) == [
        "gradprobe/v1/leftover_pb2.py",
        "gradprobe/v1/reliability_pb2.py",
    ]


CLIENT = textwrap.dedent(
    """
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the generated stubs
    import grpc
    import numpy as np
    from gradprobe.v1 import reliability_pb2 as pb, reliability_pb2_grpc as pb_grpc

    pixels = np.load(sys.argv[2])
    images = [
        pb.Image(raw=pb.RawPixels(data=p.tobytes(), shape=[28, 28], dtype=pb.RawPixels.FLOAT32))
        for p in pixels
    ]
    with grpc.insecure_channel(sys.argv[1]) as channel:
        stub = pb_grpc.ReliabilityStub(channel)
        response = stub.Assess(pb.AssessRequest(images=images), timeout=60)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    project = [m for m in sys.modules if m.split(".")[0] in ("service", "detectors", "benchmarks")]
    assert not project, project
    for r in response.results:
        print(info.classes[r.predicted_class], pb.Verdict.Name(r.verdict))
    """
)


@pytest.mark.slow
def test_a_client_generated_from_the_proto_alone_works(tmp_path, assessor):
    from grpc_tools import protoc

    out = tmp_path / "stubs"
    out.mkdir()
    status = protoc.main(
        [
            "protoc",
            f"-I{PROTO.parents[2]}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO),
        ]
    )
    assert status == 0
    (out / "client.py").write_text(CLIENT)
    images = sample_images(per_kind=1)
    np_file = tmp_path / "images.npy"
    import numpy as np

    np.save(np_file, images)
    server = start_server(assessor)
    try:
        # -I: no PYTHONPATH, no user site, no current folder: only the stubs are added.
        result = subprocess.run(
            [sys.executable, "-I", "client.py", server.target, str(np_file)],
            cwd=out,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.stop(0)
    assert result.returncode == 0, result.stderr
    expected = assessor.assess(images).assessments
    assert result.stdout.split("\n")[:-1] == [
        f"{assessor.classes[e.prediction]} {e.verdict.upper()}" for e in expected
    ]
