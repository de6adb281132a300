"""Per-layer curvature blocks and the math they share (capture, adapters, factors, damping).

The public extension API (see the README section "Writing your own curvature"):
:class:`FactorProtocol`, :class:`BlockProtocol`, :class:`AdapterProtocol` and the capability
attributes they declare (:mod:`curvature.protocols`), :func:`register_adapter`, and the shipped
pieces a researcher composes with.
"""

from curvature.adapters import (
    Conv2dAdapter,
    LayerAdapter,
    LinearAdapter,
    UnsupportedLayerError,
    adapter_for,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)
from curvature.blocks import CurvatureBlock, DiagonalBlock, KroneckerBlock, a_statistic, g_statistic, vec_c
from curvature.capture import ChunkedRecord, LayerRecord
from curvature.chunked import ChunkedBlock
from curvature.damping import AdaptiveLM, DampingPolicy, FactoredPi, Tikhonov
from curvature.factors import (
    BFGSFactor,
    EMACovarianceFactor,
    Factor,
    HessianActionFactor,
    LBFGSFactor,
    SecantFactor,
)
from curvature.inverter import BatchedInverter
from curvature.pair_damping import DoubleDamping
from curvature.protocols import (
    BLOCK_CAPABILITIES,
    FACTOR_CAPABILITIES,
    AdapterProtocol,
    BlockProtocol,
    FactorProtocol,
    declares,
)

__all__ = [
    # extension protocols and capabilities
    "FactorProtocol", "BlockProtocol", "AdapterProtocol", "FACTOR_CAPABILITIES", "BLOCK_CAPABILITIES", "declares",
    # layer adapters and their registry
    "LayerAdapter", "LinearAdapter", "Conv2dAdapter", "UnsupportedLayerError",
    "register_adapter", "unregister_adapter", "registered_adapters", "adapter_for",
    # blocks and factors
    "CurvatureBlock", "KroneckerBlock", "DiagonalBlock", "ChunkedBlock", "vec_c", "a_statistic", "g_statistic",
    "Factor", "EMACovarianceFactor", "SecantFactor", "BFGSFactor", "LBFGSFactor", "HessianActionFactor",
    # what blocks receive
    "LayerRecord", "ChunkedRecord", "BatchedInverter", "DampingPolicy", "Tikhonov", "FactoredPi", "AdaptiveLM", "DoubleDamping",
]
