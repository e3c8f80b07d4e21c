"""Per-example scores and explanation-quality metrics, in the style of ``captum.metrics``."""

from captum_ext.metrics.explanation import (
    PerturbationCurves,
    StructureCurves,
    deletion,
    insertion,
    masking_score,
    structure_deletion,
    structure_insertion,
    voice_iou,
    voice_snr,
)

__all__ = [
    "PerturbationCurves",
    "StructureCurves",
    "deletion",
    "insertion",
    "masking_score",
    "structure_deletion",
    "structure_insertion",
    "voice_iou",
    "voice_snr",
]
