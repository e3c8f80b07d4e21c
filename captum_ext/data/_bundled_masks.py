"""Moved to :mod:`captum_ext.bundled` (this private module only forwards, with a warning)."""

from captum_ext._utils.deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "BUNDLED_MASK_LAYERS": "captum_ext.bundled:BUNDLED_MASK_LAYERS",
        "MASK_OPTIONS": "captum_ext.bundled:MASK_OPTIONS",
        "load_bundled_mask_explainer": "captum_ext.bundled:load_bundled_mask_explainer",
    },
)
