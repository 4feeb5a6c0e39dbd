"""The ops seam between the model and its kernels (see interface.py): forms, and the choice of one per run."""

from mer_jax.ops.interface import CHOICES, CPU_FFI, FORMS, REFERENCE, XLA, Ops, choose, choose_for_mesh, describe

__all__ = ["CHOICES", "CPU_FFI", "FORMS", "REFERENCE", "XLA", "Ops", "choose", "choose_for_mesh", "describe"]
