"""Attribution methods: Grad-CAM, contrastive, counterfactual, Finer-CAM, Grad-CAM++ maps; VOICE;
activation-matching minimal masks; IBA bottleneck maps; PathwayGradient."""

from ._cam import RandomMapsWarning
from .activation_matching import (
    WEIGHT_PRESETS,
    ActivationMatchingMask,
    ActivationMatchingResult,
    MaskLossWeights,
)
from .contrast_cam import ContrastCAM
from .contrastive import Contrastive, ContrastiveForward
from .counterfactual_cam import CounterfactualCAM
from .finer_cam import FinerCAM
from .grad_cam import GradCAM
from .grad_cam_plus_plus import LayerGradCamPlusPlus
from .layer_iba import LayerIBA, upsample_bits
from .pathway_gradient import PathwayGradient, PathwayGradientResult
from .voice import VOICE, VOICEResult

__all__ = [
    "ActivationMatchingMask",
    "ActivationMatchingResult",
    "ContrastCAM",
    "Contrastive",
    "ContrastiveForward",
    "CounterfactualCAM",
    "FinerCAM",
    "GradCAM",
    "LayerGradCamPlusPlus",
    "LayerIBA",
    "MaskLossWeights",
    "PathwayGradient",
    "PathwayGradientResult",
    "RandomMapsWarning",
    "VOICE",
    "VOICEResult",
    "WEIGHT_PRESETS",
    "upsample_bits",
]
