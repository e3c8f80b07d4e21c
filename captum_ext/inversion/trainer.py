"""Moved: :class:`NetworkInversion` lives in :mod:`captum_ext.inversion.network_inversion`.

Importing from here still works, with a DeprecationWarning; import from
:mod:`captum_ext.inversion` instead.
"""

from captum_ext._utils.deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {
        name: f"captum_ext.inversion.network_inversion:{name}"
        for name in ("LOSS_TERMS", "PRESETS", "NetworkInversion")
    },
)
