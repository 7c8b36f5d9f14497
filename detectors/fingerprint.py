"""Content keys for cached artifacts: what the code does, not how it is written.

A cache key over source files should change when behaviour may change, and not when a comment,
a docstring or the formatting does (which would retrain models for nothing). The fingerprint
hashes each file's syntax tree with docstrings removed; comments and layout never reach it.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over the docstring-free syntax trees of ``paths`` (sorted by path)."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        tree = _without_docstrings(ast.parse(path.read_text()))
        digest.update(path.name.encode())
        digest.update(ast.dump(tree, include_attributes=False).encode())
    return digest.hexdigest()
