"""Introspective learning (Prabhushankar & AlRegib, NeurIPS 2022): a reflective second stage.

Import layer L4, beside :mod:`captum_ext.inversion`: like it, this package trains something
on top of a user's model (a stage-2 head), which is neither an attribution method
(:mod:`captum_ext.attr`) nor a read-out of one (:mod:`captum_ext.metrics`); its features reuse
the metrics' final-linear-layer machinery of GradTrust.
"""

from .features import FORMS, NORMALIZATIONS, introspective_features
from .network import IntrospectiveNetwork, make_head

__all__ = [
    "FORMS",
    "NORMALIZATIONS",
    "IntrospectiveNetwork",
    "introspective_features",
    "make_head",
]
