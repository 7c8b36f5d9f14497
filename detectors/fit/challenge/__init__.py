"""Challenge data: corrupted (CURE-TSR-style) and out-of-distribution 28x28 images."""

from detectors.fit.challenge.adversarial import (
    ATTACKS,
    AttackResult,
    AttackSpec,
    attack,
    success_report,
)
from detectors.fit.challenge.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    corrupt,
    plot_corruption_grid,
)
from detectors.fit.challenge.ood import (
    OOD_SETS,
    font_letters,
    letter_fonts,
    mnist_digits,
    natural_patches,
)

__all__ = [
    "ATTACKS",
    "CORRUPTIONS",
    "OOD_SETS",
    "SEVERITIES",
    "AttackResult",
    "AttackSpec",
    "attack",
    "corrupt",
    "font_letters",
    "letter_fonts",
    "mnist_digits",
    "natural_patches",
    "plot_corruption_grid",
    "success_report",
]
