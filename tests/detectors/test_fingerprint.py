"""Cache keys follow behaviour, not docstrings or formatting."""

from __future__ import annotations

from detectors.fingerprint import code_fingerprint


def test_docstrings_comments_and_layout_do_not_change_the_key(tmp_path) -> None:
    a, b = tmp_path / "m.py", tmp_path / "other" / "m.py"
    b.parent.mkdir()
    a.write_text('"""Doc."""\n\ndef f(x):\n    """Says hi."""\n    return x + 1\n')
    b.write_text("def f(x):  # a comment\n    return (x\n            + 1)\n")
    assert code_fingerprint([a]) == code_fingerprint([b])


def test_behaviour_changes_change_the_key(tmp_path) -> None:
    a = tmp_path / "m.py"
    a.write_text("def f(x):\n    return x + 1\n")
    before = code_fingerprint([a])
    a.write_text("def f(x):\n    return x + 2\n")
    assert code_fingerprint([a]) != before
    a.write_text('def f(x):\n    """Only a docstring."""\n')
    assert code_fingerprint([a]) != before
