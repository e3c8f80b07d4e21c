"""captum-ext: contrastive, counterfactual and uncertainty explanations as Captum citizens."""

from typing import Any

__version__ = "0.1.0"

__all__ = ["model_lock"]


def __getattr__(name: str) -> Any:
    # imported on first use: `import captum_ext` stays free of torch
    if name == "model_lock":
        from ._utils.model_state import model_lock

        return model_lock
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
