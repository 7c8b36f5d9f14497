"""The layers stay visible: the core knows no gRPC and no serving, serving needs nothing that
only fitting uses, and nothing imports upward."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Fitting (challenge data, training, evaluation, the built-in example's data and H).
FIT_ONLY = ("detectors.fit",)
# Third-party packages installed by the `fit` extra, not by a serving install.
FIT_PACKAGES = ("torchvision", "torchattacks", "pytorch_ood", "sklearn", "skimage", "scipy",
                "mlxtend", "matplotlib", "skl2onnx")  # fmt: skip
SERVING = ("service.server", "service.registry", "service.assessor", "service.inputs",
           "service.client", "service.batcher", "service.metrics", "service.errors",
           "service.settings", "service.security")  # fmt: skip


def imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def module_path(name: str) -> Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_the_core_never_imports_serving_or_the_cli() -> None:
    for path in (ROOT / "detectors").rglob("*.py"):
        upward = {m for m in imports(path, top_level_only=False) if m.split(".")[0] == "service"}
        assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}"


def test_the_core_never_imports_fitting() -> None:
    core = [p for p in (ROOT / "detectors").glob("*.py")]
    for path in core:
        upward = {m for m in imports(path, top_level_only=False) if m.startswith(FIT_ONLY)}
        assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}"


def test_serving_modules_import_nothing_of_fitting_at_load() -> None:
    seen, todo = set(), list(SERVING)
    while todo:
        name = todo.pop()
        if name in seen or not module_path(name).exists():
            continue
        seen.add(name)
        for imported in imports(module_path(name), top_level_only=True):
            assert not imported.startswith(FIT_ONLY), f"{name} imports {imported} at load"
            assert imported.split(".")[0] not in FIT_PACKAGES, f"{name} imports {imported}"
            if imported.split(".")[0] in ("detectors", "service"):
                todo.append(imported)
    assert "detectors.model_dir" in seen and "detectors.gradients" in seen


# As if the packages were not installed: `import` fails, `importlib.util.find_spec` is None.
BLOCKER = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
"""


@pytest.mark.slow
def test_assessing_with_a_model_dir_needs_no_fit_package(byom_dir) -> None:
    """A serving install (no `fit` extra) loads a fitted model dir and assesses images."""
    script = (
        BLOCKER.format(blocked=set(FIT_PACKAGES))
        + f"""
import numpy as np
from service.registry import load_assessors
from service.server import ReliabilityServer
(assessor,) = load_assessors([{str(byom_dir)!r}])
batch = assessor.assess(np.random.default_rng(0).random((3, 3, 20, 24), dtype=np.float32))
print(len(batch.assessments), sorted(m for m in sys.modules if m.startswith("detectors.")))
"""
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("3 ")
    assert not any(m in done.stdout for m in FIT_ONLY)
