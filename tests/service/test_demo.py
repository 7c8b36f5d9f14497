"""The main job (`gradprobe demo`, run by `make demo`) end to end, on a few images per set."""

from __future__ import annotations

import re

from service.demo import run_demo


def test_demo_serves_and_prints_verdicts_for_every_set(
    capsys, default_classifier, default_detector, tmp_path
) -> None:
    assert run_demo(default_classifier, per_set=12, plot=tmp_path / "demo.png", quiet=True) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert re.search(r"gRPC service gradprobe\.v1\.Reliability on 127\.0\.0\.1:\d+", out)
    verdict_section = out.split("verdicts from the service")[1]
    for name in ("clean", "MNIST digits", "noise", "snow", "PGD"):
        assert name in verdict_section
    # Every image sent was counted once by the server's Prometheus counter.
    sent = int(re.search(r"sent (\d+) images", out).group(1))
    counts = re.search(r"by verdict \(gradprobe_verdicts_total\):\n(.*)", out).group(1)
    total = sum(float(part.split(": ")[1]) for part in counts.split(", "))
    assert sent >= 12 * 4 and total == sent
