"""Old private home of :mod:`captum_ext.circuits.connection`; importing from here warns."""

from captum_ext._utils.deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {
        name: f"captum_ext.circuits.connection:{name}"
        for name in ("Connection", "default_stages", "find_classifier", "find_connections", "trace")
    },
)
