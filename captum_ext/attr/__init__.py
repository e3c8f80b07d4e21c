"""Attribution methods: Grad-CAM, contrastive, counterfactual, Grad-CAM++ maps; VOICE."""

from .contrast_cam import ContrastCAM, CounterfactualCAM
from .contrastive import Contrastive, ContrastiveForward
from .grad_cam import GradCAM
from .grad_cam_plus_plus import LayerGradCamPlusPlus
from .voice import VOICE, VOICEResult

__all__ = [
    "ContrastCAM",
    "Contrastive",
    "ContrastiveForward",
    "CounterfactualCAM",
    "GradCAM",
    "LayerGradCamPlusPlus",
    "VOICE",
    "VOICEResult",
]
