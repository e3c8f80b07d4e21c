"""Per-example scores and explanation-quality metrics, in the style of ``captum.metrics``."""

from captum_ext.metrics.accumulators import (
    AUAC,
    AUFC,
    AUPR,
    AUROC,
    DeletionAUC,
    ExpectedCalibrationError,
    FPRAtTPR,
    InsertionAUC,
    MispredictionAUROC,
)
from captum_ext.metrics.calibration import expected_calibration_error
from captum_ext.metrics.curves import (
    RetentionCurve,
    accuracy_retention_curve,
    auac,
    aufc,
    aupr,
    auroc,
    fpr_at_tpr,
    misprediction_auroc,
)
from captum_ext.metrics.dataset import SCORES, ScoreTable, score_dataset
from captum_ext.metrics.deletion_insertion import (
    PerturbationCurves,
    deletion,
    deletion_curves,
    insertion,
    insertion_curves,
)
from captum_ext.metrics.masking import masking_score
from captum_ext.metrics.structure import StructureCurves, structure_deletion, structure_insertion
from captum_ext.metrics.trust import (
    GradTrust,
    energy,
    gradnorm,
    gradtrust,
    log_likelihood,
    margin,
    mc_dropout,
    negative_entropy,
    odin,
    purview,
    softmax_confidence,
)
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
    # trust scores
    "GradTrust",
    "gradtrust",
    "softmax_confidence",
    "negative_entropy",
    "margin",
    "log_likelihood",
    "odin",
    "energy",
    "mc_dropout",
    "gradnorm",
    "purview",
    # misprediction detection
    "RetentionCurve",
    "accuracy_retention_curve",
    "auac",
    "aufc",
    "misprediction_auroc",
    # out-of-distribution detection
    "auroc",
    "aupr",
    "fpr_at_tpr",
    # calibration
    "expected_calibration_error",
    # accumulating classes (update / compute / reset)
    "AUAC",
    "AUFC",
    "MispredictionAUROC",
    "AUROC",
    "AUPR",
    "FPRAtTPR",
    "ExpectedCalibrationError",
    "DeletionAUC",
    "InsertionAUC",
    # dataset-scale scoring
    "score_dataset",
    "ScoreTable",
    "SCORES",
]
