"""captum-ext: contrastive, counterfactual and uncertainty explanations as Captum citizens."""

__version__ = "0.1.0"
