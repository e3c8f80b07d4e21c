"""Per-example scores and explanation-quality metrics, in the style of ``captum.metrics``."""

from captum_ext._utils.deprecation import moved_names
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
from captum_ext.metrics.calibration import (
    ReliabilityDiagram,
    expected_calibration_error,
    reliability_diagram,
)
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
from captum_ext.metrics.dataset import TRUST_SCORES, ScoreTable, score_dataset
from captum_ext.metrics.deletion_insertion import (
    PerturbationCurves,
    deletion,
    deletion_curves,
    insertion,
    insertion_curves,
)
from captum_ext.metrics.evaluation_accumulators import (
    ROAD,
    AttributionF1,
    Completeness,
    EnergyPointingGame,
    PointingGame,
    Soundness,
)
from captum_ext.metrics.grad_trust import GradTrust, gradtrust
from captum_ext.metrics.ground_truth import (
    AttributionPrecisionRecall,
    attribution_f1,
    attribution_precision_recall,
    energy_pointing_game,
    pointing_game,
)
from captum_ext.metrics.masking import masking_score
from captum_ext.metrics.patches import (
    null_player,
    patch_class_sensitivity,
    saturation,
    single_patch,
)
from captum_ext.metrics.remove_and_debias import (
    CompletenessCurves,
    RoadCurves,
    SoundnessCurves,
    completeness,
    road,
    road_imputation,
    soundness,
)
from captum_ext.metrics.sanity import (
    ClassSensitivity,
    RandomisationCurves,
    class_sensitivity,
    model_randomisation,
    spearman_similarity,
    ssim_similarity,
)
from captum_ext.metrics.structure import StructureCurves, structure_deletion, structure_insertion
from captum_ext.metrics.trust_baselines import (
    energy,
    gradnorm,
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
    "ReliabilityDiagram",
    "reliability_diagram",
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
    # judging attributions against ground truth and the field's checks
    "AttributionPrecisionRecall",
    "attribution_precision_recall",
    "attribution_f1",
    "pointing_game",
    "energy_pointing_game",
    "null_player",
    "patch_class_sensitivity",
    "single_patch",
    "saturation",
    "RoadCurves",
    "CompletenessCurves",
    "SoundnessCurves",
    "road",
    "road_imputation",
    "completeness",
    "soundness",
    "RandomisationCurves",
    "ClassSensitivity",
    "model_randomisation",
    "class_sensitivity",
    "spearman_similarity",
    "ssim_similarity",
    "PointingGame",
    "EnergyPointingGame",
    "AttributionF1",
    "ROAD",
    "Completeness",
    "Soundness",
    # dataset-scale scoring
    "score_dataset",
    "ScoreTable",
    "TRUST_SCORES",
]

__getattr__ = moved_names(__name__, {"SCORES": "captum_ext.metrics.dataset:TRUST_SCORES"})
