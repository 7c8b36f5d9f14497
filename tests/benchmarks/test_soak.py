"""A short soak against a real `gradprobe serve` process serving two models: no answer lost or
duplicated, nothing INTERNAL, every refusal with its expected status, probe verdicts unchanged
under the load. (No latency thresholds: those are the full soak's, on a quiet machine.)"""

from __future__ import annotations

import pytest

from benchmarks.soak import ACTIONS, markdown, plot, run, verdict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def soak(default_detector, byom_dir):
    # default_detector: the built-in model's H is built before the server process loads it.
    return run(
        duration_s=20,
        clients=12,
        model_dirs=[byom_dir],
        interval_s=5,
        probe_every_s=5,
        progress=False,
    )


def test_two_models_are_served_and_every_kind_of_request_is_sent(soak):
    assert len(soak["models"]) == 2
    by_action = soak["totals"]["by_action"]
    assert set(by_action) == set(ACTIONS), by_action
    assert soak["totals"]["sent"] >= 100


def test_no_answer_is_lost_duplicated_or_misaddressed(soak):
    totals = soak["totals"]
    assert totals["lost"] == 0, totals
    assert totals["duplicated"] == 0, totals
    assert totals["strays"] == totals["mismatches"] == 0, totals["examples"]
    assert totals["out_of_order"] == 0
    assert totals["answered"] == totals["sent"]


def test_nothing_is_internal(soak):
    codes = soak["totals"]["codes"]
    assert "INTERNAL" not in codes and "UNKNOWN" not in codes, codes
    assert soak["log_error_count"] == 0, soak["log_errors"]


def test_refusals_have_their_expected_statuses(soak):
    totals = soak["totals"]
    assert totals["unexpected"] == {}, totals["unexpected"]
    assert totals["client_errors"] == 0, totals["examples"]
    by_action = totals["by_action"]
    assert by_action["invalid"]["INVALID_ARGUMENT"] == by_action["invalid"]["sent"]
    assert by_action["unknown_model"]["NOT_FOUND"] == by_action["unknown_model"]["sent"]
    assert by_action["assess"]["OK"] == by_action["assess"]["sent"]
    # Streams mix good and malformed requests: both kinds of answer come back.
    assert by_action["stream"]["OK"] > 0 and by_action["stream"]["INVALID_ARGUMENT"] > 0


def test_probe_verdicts_stay_the_same_under_load(soak):
    assert len(soak["probes"]) >= 2
    assert all(p["same"] for p in soak["probes"]), soak["probes"]


def test_the_server_stays_up_and_exits_0_on_sigterm(soak):
    assert soak["alive"] and soak["exit_code"] == 0


def test_the_report_judges_the_run_and_the_plot_is_written(soak, tmp_path):
    checks = verdict(soak)
    for name in ("zero lost or duplicated answers", "zero INTERNAL", "probe verdicts unchanged"):
        assert checks[name][0] is True, checks[name]
    text = markdown(soak, tmp_path / "soak.png")
    assert "| 5-s interval | s | Assess OK |" in text and "Result:" in text
    plot(soak, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
