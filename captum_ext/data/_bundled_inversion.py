"""Moved to :mod:`captum_ext.bundled` (this private module only forwards, with a warning)."""

from captum_ext._utils.deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "GENERATOR_OPTIONS": "captum_ext.bundled:GENERATOR_OPTIONS",
        "bundled_generator": "captum_ext.bundled:bundled_generator",
        "load_bundled_inversion": "captum_ext.bundled:load_bundled_inversion",
    },
)
