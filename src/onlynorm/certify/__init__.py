"""Certified equivalence over the whole box: a proof, not samples.

One rounding core (:mod:`.core`: the result type, ``γ_n`` bounds, what makes a network certifiable) and one
certificate per network shape: chains of NormLinear blocks (:mod:`.mlp`: width, sparse, lowrank), residual streams
(:mod:`.stream`: deep) and CNNs (:mod:`.cnn`: conv, conv_deep). Constructions call these; ``onlynorm.verify``
dispatches to the construction. Imports run one way: constructions → certify → normnet/domain/linalg.
"""

from .core import CertifyResult, certifiability_problems, gamma_n, not_certifiable, unit_roundoff
from .mlp import certify_blocks
from .stream import certify_residual_streams

__all__ = [
    "CertifyResult",
    "certify_blocks",
    "certify_residual_streams",
    "certifiability_problems",
    "gamma_n",
    "not_certifiable",
    "unit_roundoff",
]
