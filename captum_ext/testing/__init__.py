"""Designed networks with exact ground-truth attributions, for testing attribution methods."""

from captum_ext.testing.oracles import (
    DominantColourCounter,
    MaskedInputNet,
    Oracle,
    PatchInteractionCell,
    dominant_colour_oracle,
    interaction_oracle,
    null_region_oracle,
)

__all__ = [
    "DominantColourCounter",
    "MaskedInputNet",
    "Oracle",
    "PatchInteractionCell",
    "dominant_colour_oracle",
    "interaction_oracle",
    "null_region_oracle",
]
