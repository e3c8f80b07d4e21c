"""Attribution methods: contrastive, counterfactual and Grad-CAM++ maps, Contrastive wrapper."""

from .contrast_cam import ContrastCAM, CounterfactualCAM
from .contrastive import Contrastive, ContrastiveForward
from .grad_cam_plus_plus import LayerGradCamPlusPlus

__all__ = [
    "ContrastCAM",
    "Contrastive",
    "ContrastiveForward",
    "CounterfactualCAM",
    "LayerGradCamPlusPlus",
]
