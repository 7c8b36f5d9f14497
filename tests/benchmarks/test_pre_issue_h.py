"""The pre-issue comparison's tables: AUROC per family and per kind, the two H side by side."""

from __future__ import annotations

import numpy as np

from benchmarks.pre_issue_h import _auroc, _kind_groups, _table


def test_auroc_per_family_and_kind_against_the_same_clean_images() -> None:
    kinds = np.array(["clean"] * 4 + ["ood:digits"] * 2 + ["corrupted:snow:3", "corrupted:noise:1"])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.35, 0.5, 0.0])
    assert _auroc(kinds, scores, "ood") == 0.875  # 0.9 above all four, 0.35 above three
    assert _auroc(kinds, scores, "corrupted:snow") == 1.0
    assert _auroc(kinds, scores, "corrupted") == 0.5
    assert _kind_groups(kinds) == ["corrupted:noise", "corrupted:snow", "ood:digits"]


def test_a_kind_is_not_the_kinds_its_name_begins():
    kinds = np.array(["clean", "clean", "adversarial:pgd:0.1", "adversarial:pgd_min:0.0"])
    scores = np.array([0.1, 0.2, 0.9, 0.0])
    assert _auroc(kinds, scores, "adversarial:pgd") == 1.0
    assert _auroc(kinds, scores, "adversarial:pgd_min") == 0.0
    assert _auroc(kinds, scores, "adversarial") == 0.5


def test_table_rows_show_both_and_the_difference() -> None:
    kinds = np.array(["clean"] * 3 + ["ood:a"] * 2 + ["corrupted:b:1"] * 2 + ["adversarial:c:0.1"])
    old = np.array([0.1, 0.2, 0.3, 0.25, 0.9, 0.0, 0.05, 0.5])
    new = np.array([0.1, 0.2, 0.3, 0.8, 0.9, 0.6, 0.7, 0.5])
    lines = _table("split", kinds, old, new)
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert rows["**ood** (family)"].endswith("| 0.8333 | 1.0000 | +0.1667 |")
    assert rows["corrupted:b"].endswith("| 0.0000 | 1.0000 | +1.0000 |")
    assert "adversarial:c" in rows and len(rows) == 1 + 3 + 3  # header, families, kinds
