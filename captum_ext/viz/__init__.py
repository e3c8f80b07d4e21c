"""Figures and the HTML report (needs the ``viz``/``report`` extras: matplotlib, pillow, jinja2,
tqdm; each is imported only when the function that needs it runs).

- :func:`overlay`, :func:`save_png`: a heat map over an image, as a uint8 RGB array / PNG;
  :func:`save_colorbar` draws the colour scale of a section's maps (``DEFAULT_CMAP``, a
  perceptually uniform map).
- :class:`Report`, :class:`Section`, :class:`Row`, :class:`Figure`, :class:`Table`: a modular
  HTML report.
- :func:`build_report` / :class:`ReportConfig`: what ``captum-ext report`` does, as a library
  call; :data:`SECTION_REGISTRY` maps each section name to its description and builder (one
  entry per section), all built from one :class:`SectionInputs` (model, layer, images,
  labels, predictions and probabilities computed once).
- Every section in two steps, numbers (no drawing, testable without matplotlib) then
  figures: :func:`compute_contrastive` / :func:`render_contrastive`, :func:`compute_voice` /
  :func:`render_voice`, :func:`compute_explanation_metrics` /
  :func:`render_explanation_metrics`, :func:`compute_trust` / :func:`render_trust`,
  :func:`compute_minimal_mask` / :func:`render_minimal_mask`, :func:`compute_inversion` /
  :func:`render_inversion`, :func:`compute_ood` / :func:`render_ood`,
  :func:`compute_evaluation` / :func:`render_evaluation`; each ``*_section`` function calls
  both.
- :func:`plot_reliability_diagram`: a reliability diagram (accuracy against confidence per
  bin, from :func:`captum_ext.metrics.reliability_diagram`) as a matplotlib figure.
- :func:`evaluation_section`: every method scored by deletion, insertion, ROAD, completeness
  and the sanity checks.
- :func:`contrastive_section`: the "Why P? / Why P, rather than Q? / What if not P?" section.
- :func:`voice_section`: "How uncertain is this explanation?" (VOICE uncertainty maps, IoU,
  SNR).
- :func:`explanation_metrics_section`: deletion and insertion AUCs of Grad-CAM, ContrastCAM
  and CounterfactualCAM.
- :func:`minimal_mask_section`: "What is the least this image needs?" (activation-matching
  masks, their read-outs, and the circuits of the image and of its kept pixels).
- :func:`inversion_section`: "What does the classifier think each class looks like?" (samples
  of a trained network-inversion generator, with label consistency, confidence, diversity).
- :func:`ood_section`: "Does the classifier know what it has not seen?" (a fitted TIE
  detector: garbage-class rates, AUROC / AUPR / FPR@95TPR per OOD set beside max-softmax and
  energy, score histograms, the garbage pool, the training log).
- :func:`trust_section`: "Which predictions can I trust?" (GradTrust vs softmax confidence,
  accuracy-retention curves of every trust score, the least-trusted images with their maps).
"""

from .build import SECTION_REGISTRY, ReportConfig, ReportResult, SectionInputs, build_report
from .calibration import plot_reliability_diagram
from .evaluation import EvaluationScores, compute_evaluation, evaluation_section, render_evaluation
from .inversion import InversionData, compute_inversion, inversion_section, render_inversion
from .masks import MinimalMaskData, compute_minimal_mask, minimal_mask_section, render_minimal_mask
from .ood import OODData, compute_ood, ood_section, render_ood
from .overlay import DEFAULT_CMAP, overlay, save_colorbar, save_png, to_uint8_rgb
from .report import (
    ContrastiveMaps,
    Figure,
    Report,
    Row,
    Section,
    Table,
    compute_contrastive,
    contrastive_section,
    render_contrastive,
)
from .trust import TrustData, compute_trust, render_trust, trust_section
from .uncertainty import (
    ExplanationMetricsData,
    VoiceData,
    compute_explanation_metrics,
    compute_voice,
    explanation_metrics_section,
    render_explanation_metrics,
    render_voice,
    voice_section,
)

__all__ = [
    "SECTION_REGISTRY",
    "ContrastiveMaps",
    "ReportConfig",
    "ReportResult",
    "SectionInputs",
    "build_report",
    "compute_contrastive",
    "render_contrastive",
    "DEFAULT_CMAP",
    "Figure",
    "Report",
    "Row",
    "Section",
    "Table",
    "contrastive_section",
    "explanation_metrics_section",
    "inversion_section",
    "minimal_mask_section",
    "ood_section",
    "overlay",
    "save_colorbar",
    "save_png",
    "to_uint8_rgb",
    "trust_section",
    "voice_section",
    "evaluation_section",
    "plot_reliability_diagram",
    # the two steps of each section: numbers, then figures
    "EvaluationScores",
    "ExplanationMetricsData",
    "InversionData",
    "MinimalMaskData",
    "OODData",
    "TrustData",
    "VoiceData",
    "compute_evaluation",
    "compute_explanation_metrics",
    "compute_inversion",
    "compute_minimal_mask",
    "compute_ood",
    "compute_trust",
    "compute_voice",
    "render_evaluation",
    "render_explanation_metrics",
    "render_inversion",
    "render_minimal_mask",
    "render_ood",
    "render_trust",
    "render_voice",
]
