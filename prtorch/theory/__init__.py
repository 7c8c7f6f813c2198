"""Theory: exact gradient flow, the SGD deterministic equivalent, and the paper's phase predictions.

Imports only numpy/scipy (and prtorch's core).
"""
from prtorch.theory.gradient_flow import gf_curves, gradient_flow

__all__ = ["gf_curves", "gradient_flow"]
