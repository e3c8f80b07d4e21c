r"""Per-example trust scores: GradTrust and the baselines it is compared with.

This module re-exports :mod:`captum_ext.metrics.grad_trust` (:class:`GradTrust`,
:func:`gradtrust`) and :mod:`captum_ext.metrics.trust_baselines` (the baselines); importing
from here keeps working without a warning.

Every function takes ``forward_func`` (a model returning (N, C) logits, or any output with
``output_transform`` mapping it to them), ``inputs`` (a tensor or a tuple of tensors, batch
first) and keyword options, and returns an (N,) tensor on the device of the logits. **Higher
always means more trusted.** The model is left exactly as it was found: parameters,
``requires_grad`` flags, ``.grad`` buffers, batch norm running statistics (also in train
mode), train/eval flags and hooks. On very confident models use ``gradtrust(..., log=True)``:
the score itself exceeds the float range there, its log does not.

GradTrust: M. Prabhushankar and G. AlRegib, "Counterfactual Gradients-based Quantification of
Prediction Trust in Neural Networks", IEEE MIPR 2024 (arXiv 2405.13758).
"""

from __future__ import annotations

from captum_ext.metrics.grad_trust import DEFAULT_K as DEFAULT_K
from captum_ext.metrics.grad_trust import FORMS as FORMS
from captum_ext.metrics.grad_trust import METHODS as METHODS
from captum_ext.metrics.grad_trust import GradTrust, gradtrust
from captum_ext.metrics.trust_baselines import (
    DEFAULT_MC_PASSES as DEFAULT_MC_PASSES,
)
from captum_ext.metrics.trust_baselines import (
    DEFAULT_ODIN_EPSILON as DEFAULT_ODIN_EPSILON,
)
from captum_ext.metrics.trust_baselines import (
    DEFAULT_ODIN_TEMPERATURE as DEFAULT_ODIN_TEMPERATURE,
)
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

__all__ = [
    "GradTrust",
    "energy",
    "gradnorm",
    "gradtrust",
    "log_likelihood",
    "margin",
    "mc_dropout",
    "negative_entropy",
    "odin",
    "purview",
    "softmax_confidence",
]
