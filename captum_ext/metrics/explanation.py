r"""Evaluating explanations by intervening on the input with them (a re-export module).

The functions live in one module per family; this documented path keeps importing them
without a warning:

- :mod:`captum_ext.metrics.deletion_insertion`: pixel-wise :func:`deletion`,
  :func:`insertion` (RISE) and their ``*_curves`` forms;
- :mod:`captum_ext.metrics.structure`: :func:`structure_deletion`,
  :func:`structure_insertion` (CausalCAM, Huffman bits);
- :mod:`captum_ext.metrics.masking`: :func:`masking_score`;
- :mod:`captum_ext.metrics.voice_readouts`: :func:`voice_iou`, :func:`voice_snr` (VOICE).
"""

from captum_ext.metrics._perturbation import (  # noqa: F401  (kept at their old path)
    BASELINE_NAMES,
    CHANNEL_REDUCTIONS,
    DEFAULT_BLUR_KERNEL_SIZE,
    DEFAULT_BLUR_SIGMA,
    DEFAULT_N_STEPS,
    DEFAULT_THRESHOLDS,
)
from captum_ext.metrics._perturbation import SCORE_NAMES as SCORES  # noqa: F401  (old name)
from captum_ext.metrics._perturbation import gaussian_blur as _gaussian_blur  # noqa: F401
from captum_ext.metrics.deletion_insertion import (
    PerturbationCurves,
    deletion,
    deletion_curves,
    insertion,
    insertion_curves,
)
from captum_ext.metrics.masking import masking_score
from captum_ext.metrics.structure import StructureCurves, structure_deletion, structure_insertion
from captum_ext.metrics.voice_readouts import voice_iou, voice_snr

__all__ = [
    "PerturbationCurves",
    "StructureCurves",
    "deletion",
    "deletion_curves",
    "insertion",
    "insertion_curves",
    "masking_score",
    "structure_deletion",
    "structure_insertion",
    "voice_iou",
    "voice_snr",
]
