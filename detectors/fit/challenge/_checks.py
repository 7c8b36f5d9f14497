"""Input checks shared by the corruption and attack code (both take float images in [0, 1])."""

from __future__ import annotations

import numpy as np

RANGE_TOL = 1e-4  # float rounding slack on the [0, 1] input check


def clipped_unit_range(x: np.ndarray) -> np.ndarray:
    """``x`` clipped to [0, 1] after checking it is finite and within rounding of that range."""
    if x.size:
        if not np.isfinite(x).all():
            raise ValueError("images contain NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -RANGE_TOL or hi > 1.0 + RANGE_TOL:
            raise ValueError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return np.clip(x, 0.0, 1.0)
