r"""Network inversion with a conditioned generator (Suhail, Sethi et al.).

Building blocks (conditioning builders, :class:`ConditionedGenerator`, the loss terms) and the
trainer :class:`NetworkInversion` with its presets ``"inversion"``, ``"reconstruction"``
(training-like data reconstruction, TLDR) and ``"counterfeit"`` (confidently classified
counterfeits); the evaluation of generated images (label consistency, confidence, diversity,
matched SSIM against training data, sample grids); and audits built on inversion (shortcut
learning, privacy); and TIE, out-of-distribution detection by training, inversion and
exclusion. See the spec of the method in the documentation.
"""

from captum_ext.inversion.audits import (
    PrivacyAuditResult,
    ShortcutAuditResult,
    ShortcutDataset,
    privacy_audit,
    shortcut_audit,
    shortcut_dataset,
)
from captum_ext.inversion.conditioning import (
    hot_matrices,
    one_hot_vectors,
    soft_vectors,
    vector_matrix,
)
from captum_ext.inversion.evaluation import (
    DiversityResult,
    MatchedSSIM,
    label_consistency,
    matched_ssim,
    mean_confidence,
    sample_grid,
    within_class_diversity,
)
from captum_ext.inversion.generator import (
    CONDITIONINGS,
    ConditionedGenerator,
    InversionCost,
    available_memory_bytes,
    estimate_inversion_cost,
)
from captum_ext.inversion.losses import (
    class_cosine_diversity,
    cosine_diversity,
    cross_entropy_to_labels,
    feature_orthogonality,
    kl_to_conditioning,
    perturbed_kl_ce,
    pixel_range,
    total_variation,
    weight_gradient_norm,
)
from captum_ext.inversion.network_inversion import LOSS_TERMS, PRESETS, NetworkInversion
from captum_ext.inversion.tie import (
    BASELINES,
    OOD_SCORE_KINDS,
    TIE,
    TIEPrediction,
    pen_strokes,
    pixel_range_noise,
    transformed_inputs,
    uncertainty_ue,
)
from captum_ext.inversion.tie_config import GARBAGE_NOISE_KINDS, TIE_BASELINES, TIEConfig

__all__ = [
    "CONDITIONINGS",
    "LOSS_TERMS",
    "PRESETS",
    "ConditionedGenerator",
    "InversionCost",
    "NetworkInversion",
    "available_memory_bytes",
    "cosine_diversity",
    "class_cosine_diversity",
    "cross_entropy_to_labels",
    "estimate_inversion_cost",
    "feature_orthogonality",
    "hot_matrices",
    "kl_to_conditioning",
    "one_hot_vectors",
    "perturbed_kl_ce",
    "pixel_range",
    "soft_vectors",
    "total_variation",
    "vector_matrix",
    "weight_gradient_norm",
    # evaluation
    "DiversityResult",
    "MatchedSSIM",
    "label_consistency",
    "matched_ssim",
    "mean_confidence",
    "sample_grid",
    "within_class_diversity",
    # out-of-distribution detection (TIE)
    "BASELINES",
    "OOD_SCORE_KINDS",
    "TIE",
    "TIEConfig",
    "TIE_BASELINES",
    "TIEPrediction",
    "uncertainty_ue",
    "GARBAGE_NOISE_KINDS",
    "pixel_range_noise",
    "pen_strokes",
    "transformed_inputs",
    # audits
    "PrivacyAuditResult",
    "ShortcutAuditResult",
    "ShortcutDataset",
    "privacy_audit",
    "shortcut_audit",
    "shortcut_dataset",
]
