"""Compute kernels with plain-PyTorch references (imported as ``distill.kernels``)."""

from distill.kernels.sparsity import asp_patterns, check_nm, is_nm_sparse, nm_mask

__all__ = ["asp_patterns", "check_nm", "is_nm_sparse", "nm_mask"]
