"""Attribution methods: Grad-CAM, contrastive, counterfactual and Grad-CAM++ maps, Contrastive."""

from .contrast_cam import ContrastCAM, CounterfactualCAM
from .contrastive import Contrastive, ContrastiveForward
from .grad_cam import GradCAM
from .grad_cam_plus_plus import LayerGradCamPlusPlus

__all__ = [
    "ContrastCAM",
    "Contrastive",
    "ContrastiveForward",
    "CounterfactualCAM",
    "GradCAM",
    "LayerGradCamPlusPlus",
]
