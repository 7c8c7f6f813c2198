"""Theory: exact gradient flow, the SGD deterministic equivalent, and the paper's phase predictions.

* :mod:`~prtorch.theory.gradient_flow` - exact GF from a given init (model.md §4);
* :mod:`~prtorch.theory.sgd_equivalent` - deterministic equivalent of SGD at finite lr and batch (§5);
* :mod:`~prtorch.theory.phases` - the paper's Phase I-III predictions and explicit tail exponents (§6);
* :mod:`~prtorch.theory.measure` - phase times and exponents measured on any trajectory, with CIs.

Imports only numpy/scipy (and prtorch's core).
"""
from prtorch.theory import measure, phases
from prtorch.theory.gradient_flow import gf_curves, gradient_flow

__all__ = ["gf_curves", "gradient_flow", "measure", "phases"]
