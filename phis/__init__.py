"""phis: label-free multi-teacher distillation with PHI-S normalization."""

__version__ = "0.1.0"
