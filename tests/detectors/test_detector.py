"""Detector H: fit, temperature, ONNX export, manifest checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detectors import detector
from detectors.detector import DetectorMismatch, OnnxDetector
from detectors.signals import SignalFeaturizer

CLASSIFIER_SHA = "a" * 64


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=n)
    centers = np.eye(4, 6) * 3
    return (centers[y] + rng.normal(size=(n, 6))).astype(np.float32), y


@pytest.fixture(scope="module")
def trained() -> detector.TrainedH:
    featurizer = SignalFeaturizer(groups=("logits",)).fit(np.ones((4, 2)), np.arange(4) % 2)
    x, y = _data(800, 0)
    vx, vy = _data(300, 1)
    return detector.fit(featurizer, [f"c{i}" for i in range(6)], x, y, vx, vy, hidden_layers=(16,))


def test_fit_learns_the_four_verdicts(trained) -> None:
    x, y = _data(400, 2)
    probs = trained.predict_proba_vectors(x)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-6)
    assert (probs.argmax(1) == y).mean() > 0.85


def test_onnx_export_serves_the_same_probabilities(trained, tmp_path) -> None:
    manifest = detector.export(
        trained,
        tmp_path,
        classifier_sha256=CLASSIFIER_SHA,
        training_data={"recipe": "synthetic"},
        metrics={},
    )
    served = OnnxDetector(tmp_path, CLASSIFIER_SHA)
    x, _ = _data(50, 3)
    np.testing.assert_allclose(
        served.predict_proba_vectors(x), trained.predict_proba_vectors(x), rtol=1e-4, atol=1e-6
    )
    assert manifest.verdicts == ["in_distribution", "ood", "corrupted", "adversarial"]
    assert served.version == manifest.version and len(served.sha256) == 64


def test_detector_for_another_classifier_is_refused_naming_both_hashes(trained, tmp_path) -> None:
    detector.export(
        trained, tmp_path, classifier_sha256=CLASSIFIER_SHA, training_data={}, metrics={}
    )
    other = "b" * 64
    with pytest.raises(DetectorMismatch) as info:
        OnnxDetector(tmp_path, other)
    assert CLASSIFIER_SHA in str(info.value) and other in str(info.value)


def test_altered_files_are_refused(trained, tmp_path) -> None:
    detector.export(
        trained, tmp_path, classifier_sha256=CLASSIFIER_SHA, training_data={}, metrics={}
    )
    with (tmp_path / detector.ONNX_FILE).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(DetectorMismatch, match="altered or replaced"):
        OnnxDetector(tmp_path, CLASSIFIER_SHA)
    manifest = json.loads((tmp_path / detector.MANIFEST_FILE).read_text())
    assert manifest["classifier_sha256"] == CLASSIFIER_SHA


def test_a_detector_of_an_older_format_is_read_and_a_newer_one_refused_by_name(
    trained, tmp_path
) -> None:
    detector.export(
        trained, tmp_path, classifier_sha256=CLASSIFIER_SHA, training_data={}, metrics={}
    )
    path = tmp_path / detector.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    assert manifest["format"] == detector.FORMAT
    for older in ("gradprobe.detector.v1", "gradprobe.detector.v2"):
        path.write_text(json.dumps({**manifest, "format": older}))
        assert OnnxDetector(tmp_path, CLASSIFIER_SHA).manifest.format == older
    path.write_text(json.dumps({**manifest, "format": "gradprobe.detector.v9", "new": 1}))
    with pytest.raises(DetectorMismatch, match=r"'gradprobe\.detector\.v9'.*upgrade gradprobe"):
        OnnxDetector(tmp_path, CLASSIFIER_SHA)


def test_not_a_detector_folder(tmp_path) -> None:
    with pytest.raises(DetectorMismatch, match="gradprobe fit --classifier"):
        OnnxDetector(tmp_path, CLASSIFIER_SHA)


def test_temperature_recovers_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 4)) * 2
    true_probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in true_probs])
    overconfident = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)
    temperature = detector.fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.15)
    calibrated = detector._softmax_t(np.log(overconfident), temperature)
    assert detector.expected_calibration_error(
        calibrated, labels
    ) < detector.expected_calibration_error(overconfident, labels)


def test_missing_verdicts_in_training_data() -> None:
    x, y = _data(100, 0)
    with pytest.raises(ValueError, match="lacks verdicts"):
        detector.fit(SignalFeaturizer(), [], x[y < 3], y[y < 3], x, y)


def test_guard_only_columns_reach_the_guard_and_not_the_mlp(tmp_path) -> None:
    from detectors.stability import STABILITY_COLUMNS

    featurizer = SignalFeaturizer(groups=("logits",)).fit(np.ones((4, 2)), np.arange(4) % 2)
    columns = [f"c{i}" for i in range(5)] + ["msp", *STABILITY_COLUMNS]
    rng = np.random.default_rng(4)

    def rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = _data(n, seed)
        # Clean rows' softmax barely moves under squeezing; the other kinds' moves far.
        moves = np.where(y == 0, -8.0, -1.0)[:, None] + rng.normal(0, 0.5, (n, 3))
        return np.hstack([x, moves]).astype(np.float32), y

    (x, y), (vx, vy) = rows(800, 0), rows(300, 1)
    trained = detector.fit(featurizer, columns, x, y, vx, vy, hidden_layers=(16,), guard=True)
    assert trained.h_inputs == list(range(6))  # the MLP reads the first six columns only
    assert trained.guard is not None
    assert [columns[i] for i in trained.guard.columns] == ["msp", "squeeze_l1_max"]
    manifest = detector.export(
        trained, tmp_path, classifier_sha256=CLASSIFIER_SHA, training_data={}, metrics={}
    )
    assert manifest.h_inputs == list(range(6))
    served = OnnxDetector(tmp_path, CLASSIFIER_SHA)
    test, test_y = rows(60, 5)
    before = served.predict_proba_vectors(test)
    np.testing.assert_allclose(before, trained.predict_proba_vectors(test), rtol=1e-4, atol=1e-6)
    # Clean images whose softmax now moves far under squeezing: the guard lowers
    # P(in_distribution); H's split of the rest is its own.
    moved = test.copy()
    moved[:, -3:] = 0.0
    after = served.predict_proba_vectors(moved)
    clean = test_y == 0
    assert (after[clean, 0] < before[clean, 0]).all()
    np.testing.assert_allclose(after[:, 2] / after[:, 1], before[:, 2] / before[:, 1], rtol=1e-4)

    path = tmp_path / detector.MANIFEST_FILE
    values = json.loads(path.read_text())
    path.write_text(json.dumps({**values, "h_inputs": list(range(7))}))
    with pytest.raises(DetectorMismatch, match=r"names 7 of its columns.*takes 6"):
        OnnxDetector(tmp_path, CLASSIFIER_SHA)


def test_squeezing_is_asked_for_only_when_something_reads_it(trained, tmp_path) -> None:
    from detectors.stability import STABILITY_COLUMNS

    # An older detector: no stability group, a manifest without h_inputs.
    detector.export(
        trained, tmp_path, classifier_sha256=CLASSIFIER_SHA, training_data={}, metrics={}
    )
    path = tmp_path / detector.MANIFEST_FILE
    values = json.loads(path.read_text())
    del values["h_inputs"]
    path.write_text(json.dumps({**values, "format": "gradprobe.detector.v2"}))
    assert not OnnxDetector(tmp_path, CLASSIFIER_SHA).needs_squeezed_logits

    # The stability group computed, but neither the MLP nor a guard reads it.
    featurizer = SignalFeaturizer(groups=("logits", "stability"))
    featurizer.fit(np.ones((4, 2)), np.arange(4) % 2)
    columns = [f"c{i}" for i in range(6)] + list(STABILITY_COLUMNS)
    x, y = _data(400, 0)
    vx, vy = _data(200, 1)
    pad = np.zeros((1, 3), np.float32)
    unread = detector.fit(
        featurizer,
        columns,
        np.hstack([x, pad.repeat(400, 0)]),
        y,
        np.hstack([vx, pad.repeat(200, 0)]),
        vy,
        hidden_layers=(8,),
    )
    out = tmp_path / "unread"
    detector.export(unread, out, classifier_sha256=CLASSIFIER_SHA, training_data={}, metrics={})
    served = OnnxDetector(out, CLASSIFIER_SHA)
    assert served.featurizer.needs_squeezed_logits and not served.needs_squeezed_logits
