"""The shipped Fashion-MNIST H against the H shipped before "bring your own classifier", on the
same classifier and the same test images.

    python -m benchmarks.pre_issue_h [--commit 977f961] [--home DIR]

The pre-issue H read absolute image statistics (the black background); the current one reads
only signals measured relative to the user's clean images. The two reports cannot be compared
as written: each was made on its own challenge data. This script puts both H on both test
splits:

1. the current default model dir (built first if absent) gives its test split;
2. the pre-issue commit, checked out into a temporary git worktree and run in a subprocess with
   its own ``GRADPROBE_HOME`` (``--home``, kept between runs: its caches are keyed by content),
   trains its default classifier and H as it shipped them, writes its own test split and
   scores both splits;
3. this process scores both splits with the current H, checks that the two classifiers hold
   the same weights (the Fashion-MNIST CNN is trained by the same seeded recipe; if they
   differ, the attack rows measure transfer attacks and the table says so), and writes
   ``benchmarks/detector/PRE_ISSUE.md``.

About fifteen minutes on 2 CPU cores the first time (the old pipeline trains its own H), a few
after. Needs the git history (a clone, not an export).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "detector" / "PRE_ISSUE.md"
# The last commit before the bring-your-own-classifier work (issue 10).
PRE_ISSUE_COMMIT = "977f961a1055455874331dc501f4e4d3ae4afa7b"
FAMILIES = ("ood", "corrupted", "adversarial")

# Runs inside the pre-issue tree: its classifier and H, as `gradprobe train-detector` built them.
_OLD_SIDE = r"""
import json, sys
import numpy as np, torch
from service.artifacts import ensure_default_model, load_default_detector
from service.assessor import Assessor
from service.classifier import load_classifier
from detectors.training import prepare

torch.set_num_threads(int(sys.argv[3]))
work, current_split = sys.argv[1], sys.argv[2]
model_dir = ensure_default_model(quiet=False)
loaded = load_classifier(model_dir, device="cpu")
detector = load_default_detector(loaded, quiet=False)
assessor = Assessor(loaded, detector, device="cpu")
test = prepare(loaded.module, loaded.manifest.sha256, progress=True).splits["test"]
np.savez_compressed(f"{work}/pre_issue_test.npz", images=test.images, kind=test.kind)

def scores(images):
    out = []
    for i in range(0, len(images), 64):
        batch = assessor.assess(images[i : i + 64]).assessments
        out += [1.0 - a.scores["in_distribution"] for a in batch]
    return out

with np.load(current_split) as current:
    result = {
        "classifier": str(loaded.path),
        "detector": detector.version,
        "pre_issue": scores(test.images),
        "current": scores(current["images"]),
    }
with open(f"{work}/pre_issue_scores.json", "w") as f:
    json.dump(result, f)
"""


def _auroc(kinds: np.ndarray, scores: np.ndarray, group: str) -> float:
    """AUROC of the images of ``group`` (a family, "ood", or a kind, "adversarial:pgd", which
    is not "adversarial:pgd_min") against the clean ones."""
    from sklearn.metrics import roc_auc_score

    kinds = kinds.astype(str)
    clean = kinds == "clean"
    chosen = (kinds == group) | np.char.startswith(kinds, group + ":")
    y = np.r_[np.zeros(clean.sum()), np.ones(chosen.sum())]
    return float(roc_auc_score(y, np.r_[scores[clean], scores[chosen]]))


def _kind_groups(kinds: np.ndarray) -> list[str]:
    return sorted({":".join(str(k).split(":")[:2]) for k in kinds if k != "clean"})


def _same_weights(a: Path, b: Path) -> bool:
    import torch

    left, right = torch.export.load(a).state_dict, torch.export.load(b).state_dict
    return sorted(left) == sorted(right) and all(torch.equal(left[k], right[k]) for k in left)


def _current_scores(assessor: object, images: np.ndarray) -> np.ndarray:
    out: list[float] = []
    for i in range(0, len(images), 64):
        batch = assessor.assess(images[i : i + 64])  # type: ignore[attr-defined]
        out += [1.0 - a.scores["in_distribution"] for a in batch.assessments]
    return np.array(out)


def _table(title: str, kinds: np.ndarray, old: np.ndarray, new: np.ndarray) -> list[str]:
    lines = [f"### {title}", "", "| images | pre-issue H | current H | current − pre-issue |"]
    lines.append("|---|---:|---:|---:|")
    rows = [(f"**{f}** (family)", f) for f in FAMILIES]
    rows += [(g, g) for g in _kind_groups(kinds)]
    for label, group in rows:
        a, b = _auroc(kinds, old, group), _auroc(kinds, new, group)
        lines.append(f"| {label} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default=PRE_ISSUE_COMMIT, help="the pre-issue commit")
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="GRADPROBE_HOME of the pre-issue pipeline (default: pre-issue/ in this one's)",
    )
    args = parser.parse_args(argv)

    from detectors.fit.challenge.dataset import ChallengeSplit
    from detectors.model_dir import gradprobe_home
    from service.server import load_assessors
    from service.settings import Settings

    (assessor,) = load_assessors(Settings(device="cpu"))
    cache = Path(assessor.classifier.manifest.recipe["cache"])
    current = ChallengeSplit.load(cache / "test.npz")
    home = args.home or gradprobe_home() / "pre-issue" / args.commit[:12]
    with tempfile.TemporaryDirectory() as tmp:
        work, tree = Path(tmp), Path(tmp) / "tree"
        np.savez_compressed(work / "current_test.npz", images=current.images)
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.commit],
            check=True,
            capture_output=True,
        )
        try:
            env = {**os.environ, "GRADPROBE_HOME": str(home), "PYTHONPATH": str(tree)}
            threads = str(max(1, os.cpu_count() or 1))
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _OLD_SIDE,
                    str(work),
                    str(work / "current_test.npz"),
                    threads,
                ],
                cwd=tree,
                env=env,
                check=True,
            )
            old = json.loads((work / "pre_issue_scores.json").read_text())
            with np.load(work / "pre_issue_test.npz") as stored:
                pre_images, pre_kinds = stored["images"], stored["kind"].astype(str)
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                check=False,
                capture_output=True,
            )
    same = _same_weights(Path(old["classifier"]), assessor.classifier.path)
    new_on_pre = _current_scores(assessor, pre_images)
    new_on_current = _current_scores(assessor, current.images)
    kinds = current.kind.astype(str)
    lines = [
        "# The shipped Fashion-MNIST H against the pre-issue H, on the same images",
        "",
        "Written by `python -m benchmarks.pre_issue_h`; do not edit by hand.",
        "",
        f"Pre-issue H: commit {args.commit[:12]} (detector {old['detector']}), absolute image "
        f"statistics (it read the black background). Current H: "
        f"{assessor.detector.version}, signals relative to the clean training images only.",
        "Classifiers: "
        + (
            "the same weights (both pipelines train the Fashion-MNIST CNN by one seeded recipe)."
            if same
            else "DIFFERENT weights: the adversarial rows measure attacks made for one "
            "classifier on the other."
        ),
        "Score: 1 − P(in_distribution); AUROC of each set against the clean images of the same "
        "split. Each H saw its own split's kinds in training (other images of them), not the "
        "other split's generators: the other split is new to it.",
        "",
        *_table(
            f"Pre-issue test split ({len(pre_kinds)} images)",
            pre_kinds,
            np.array(old["pre_issue"]),
            new_on_pre,
        ),
        *_table(
            f"Current test split ({len(kinds)} images)",
            kinds,
            np.array(old["current"]),
            new_on_current,
        ),
    ]
    OUT.write_text("\n".join(lines))
    print(OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
