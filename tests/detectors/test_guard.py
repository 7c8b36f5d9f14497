"""The novelty guard: an image far into the clean images' tails is not called clean, even when
H (trained on other kinds) is fooled; clean images and H's split of the rest stay as they were."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detectors.guard import NoveltyGuard

COLUMNS = ["log_grad[rank0][conv]", "knn10_cosine_distance", "msp", "rel_image_distance"]


def rows(n: int, rng: np.random.Generator, knn_shift: float = 0.0) -> np.ndarray:
    x = rng.normal(0, 1, (n, len(COLUMNS)))
    x[:, 1] = rng.gamma(2.0, 0.05, n) + knn_shift  # a distance: positive, right-skewed
    x[:, 2] = rng.uniform(0.9, 1.0, n)  # confident
    return x.astype(np.float32)


def h_probs(p_id: np.ndarray) -> np.ndarray:
    rest = (1 - p_id)[:, None] * np.array([[0.5, 0.3, 0.2]])
    return np.column_stack([p_id, rest])


@pytest.fixture(scope="module")
def guard() -> NoveltyGuard:
    rng = np.random.default_rng(0)
    clean, seen = rows(600, rng), rows(600, rng)
    vectors = np.concatenate([clean, seen])
    # H separates the kind it was trained on.
    probs = h_probs(np.r_[rng.uniform(0.8, 1.0, 600), rng.uniform(0.0, 0.2, 600)])
    labels = np.r_[np.zeros(600, int), np.ones(600, int)]
    fitted = NoveltyGuard.fit(COLUMNS, vectors, probs, labels)
    assert fitted is not None
    return fitted


def test_an_unseen_kind_that_fools_h_is_still_caught(guard) -> None:
    rng = np.random.default_rng(1)
    clean, unseen = rows(500, rng), rows(500, rng, knn_shift=1.0)  # far from the clean bank
    fooled = h_probs(rng.uniform(0.8, 1.0, 500))  # H calls both clean
    p_clean = guard.apply(clean, fooled)[:, 0]
    p_unseen = guard.apply(unseen, fooled)[:, 0]
    assert np.median(p_unseen) < 0.1 < 0.5 < np.median(p_clean)
    assert (p_unseen < np.quantile(p_clean, 0.05)).mean() > 0.95


def test_probabilities_sum_to_one_and_keep_hs_split(guard) -> None:
    rng = np.random.default_rng(2)
    vectors = rows(50, rng, knn_shift=0.5)
    probs = guard.apply(vectors, h_probs(rng.uniform(0, 1, 50)))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs[:, 2] / probs[:, 1], 0.6, rtol=1e-6)
    nothing_left = guard.apply(vectors[:1], np.array([[1.0, 0.0, 0.0, 0.0]]))
    assert nothing_left[0, 2] == nothing_left[0, 3] == 0.0 and nothing_left[0, 1] > 0


def test_h_still_decides_where_the_guard_sees_nothing(guard) -> None:
    rng = np.random.default_rng(3)
    vectors = rows(400, rng)  # clean-looking on every one-class signal
    p_id = np.r_[np.full(200, 0.95), np.full(200, 0.02)]
    out = guard.apply(vectors, h_probs(p_id))[:, 0]
    assert out[:200].mean() > 0.5 > 0.2 > out[200:].mean()


def test_round_trip_through_json_and_no_guard_without_its_signals(guard) -> None:
    again = NoveltyGuard.from_dict(json.loads(json.dumps(guard.to_dict())))
    rng = np.random.default_rng(4)
    vectors, probs = rows(20, rng, 0.3), h_probs(rng.uniform(0, 1, 20))
    np.testing.assert_allclose(again.apply(vectors, probs), guard.apply(vectors, probs))
    only_gradients = NoveltyGuard.fit(["log_grad[rank0][conv]"], vectors[:, :1], probs,
                                      np.zeros(20, int))  # fmt: skip
    assert only_gradients is None


def test_each_signal_has_its_own_power(guard) -> None:
    """Distances count only far in their tail, confidence from lower in it."""
    from detectors.guard import GUARD_SIGNALS

    own = {name: power for name, _, power in GUARD_SIGNALS}
    names = [COLUMNS[c] for c in guard.columns]
    assert guard.powers == [own[n] for n in names]
    assert own["knn10_cosine_distance"] > own["msp"]
    # A clean-rank of 0.95 moves u through msp (0.95**2) far more than through KNN (0.95**12).
    rng = np.random.default_rng(5)
    base = rows(1, rng)
    probs = h_probs(np.array([0.99]))
    knn_tail, msp_tail = base.copy(), base.copy()
    knn_tail[0, 1] = np.quantile(guard.references[names.index("knn10_cosine_distance")], 0.95)
    msp_tail[0, 2] = -np.quantile(guard.references[names.index("msp")], 0.95)
    assert guard.novelty(msp_tail, probs)[0] > guard.novelty(knn_tail, probs)[0] + 0.2


def test_a_guard_saved_before_per_signal_powers_uses_one_power(guard) -> None:
    """Detectors fitted by earlier releases have no ``powers``: every signal takes ``power``."""
    old = guard.to_dict()
    del old["powers"]
    restored = NoveltyGuard.from_dict(old)
    uniform = NoveltyGuard.from_dict({**guard.to_dict(), "powers": None})
    rng = np.random.default_rng(6)
    vectors, probs = rows(30, rng, 0.2), h_probs(rng.uniform(0, 1, 30))
    np.testing.assert_allclose(restored.novelty(vectors, probs), uniform.novelty(vectors, probs))
    assert restored.power == 2.0


def test_an_attack_undone_by_squeezing_is_caught_when_h_misses_it() -> None:
    columns = ["msp", "squeeze_l1_max"]
    rng = np.random.default_rng(3)

    def attack_free(n: int) -> np.ndarray:  # confident, and squeezing barely moves the softmax
        return np.column_stack([rng.uniform(0.9, 1.0, n), rng.normal(-8.0, 1.0, n)])

    vectors = np.concatenate([attack_free(600), attack_free(600)]).astype(np.float32)
    labels = np.r_[np.zeros(600, int), np.ones(600, int)]
    probs = h_probs(np.r_[rng.uniform(0.8, 1.0, 600), rng.uniform(0.0, 0.2, 600)])
    guard = NoveltyGuard.fit(columns, vectors, probs, labels)
    assert guard is not None and guard.columns == [0, 1]
    clean = attack_free(300).astype(np.float32)
    attacked = clean.copy()
    attacked[:, 1] = rng.normal(-1.0, 0.5, 300)  # the squeezed views' softmax moves far
    fooled = h_probs(rng.uniform(0.8, 1.0, 300))
    p_clean, p_attacked = guard.apply(clean, fooled)[:, 0], guard.apply(attacked, fooled)[:, 0]
    assert (p_attacked < np.quantile(p_clean, 0.05)).mean() > 0.95
