"""ChallengeSplit: what a split holds survives the disk, and selections stay aligned."""

from __future__ import annotations

import numpy as np

from detectors.fit.challenge.dataset import FAMILIES, ChallengeSplit


def _split() -> ChallengeSplit:
    rng = np.random.default_rng(0)
    return ChallengeSplit(
        images=rng.random((6, 3, 5, 7), dtype=np.float32),
        family=np.array([0, 1, 2, 3, 3, 2]),
        kind=np.array(["clean", "ood:noise", "corrupted:snow:3", "adversarial:pgd:0.03",
                       "adversarial:pgd_min", "corrupted:jpeg:1"]),
        source=np.array([4, -1, 7, 4, 9, 1]),
        attack_success={"pgd:0.03": 0.5, "pgd_min": 0.25},
    )  # fmt: skip


def test_save_load_round_trip(tmp_path) -> None:
    split = _split()
    split.save(tmp_path / "s.npz")
    back = ChallengeSplit.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.images, split.images)
    np.testing.assert_array_equal(back.family, split.family)
    assert back.kind.tolist() == split.kind.tolist()
    np.testing.assert_array_equal(back.source, split.source)
    assert back.attack_success == split.attack_success
    assert len(back) == 6


def test_select_keeps_rows_aligned() -> None:
    split = _split()
    adversarial = split.select(split.family == FAMILIES.index("adversarial"))
    assert adversarial.kind.tolist() == ["adversarial:pgd:0.03", "adversarial:pgd_min"]
    np.testing.assert_array_equal(adversarial.source, [4, 9])
    np.testing.assert_array_equal(adversarial.images, split.images[[3, 4]])
