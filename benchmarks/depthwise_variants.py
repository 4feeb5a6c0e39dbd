"""Depthwise-convolution formulations for the layout studies in benchmarks/run.py and benchmarks/accelerator.py.

XLA's CPU backend runs a grouped convolution (`feature_group_count == channels`) through a slow generic
path, its gradients above all. The xla and cpu_ffi ops forms (mer_jax/ops) therefore compute depthwise convs
as a sum of k*k shifted, strided slices times per-channel weights (or as C++ kernels):

    y[n, i, j, c] = sum_{a, b} x_pad[n, s*i + a, s*j + b, c] * w[a, b, 0, c]

while the reference form (GPUs, TPUs, export) keeps XLA's grouped conv. `with_depthwise(ops, name)` is an ops
form whose depthwise convs are one formulation, everything else as in `ops`:

  'explicit'        shifted slices, plain autodiff (no hand-written gradients)
  'shifted_slices'  the xla form's: shifted slices with its hand-written gradients
                    (`xla.depthwise_input_grad`, `xla.depthwise_kernel_grad`)
  'grouped'         lax.conv_general_dilated, NHWC, feature_group_count = C (the reference form's)
  'grouped_nchw'    the same on NCHW (transposes in and out)

The model's modules call `ops.depthwise_conv` with the very same `kernel` parameter (kh, kw, 1, C), so
parameters, initialisation and outputs are unchanged (up to float32 summation order): the benchmarks can time
the real train step each way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mer_jax import ops as ops_lib
from mer_jax.ops import reference
from mer_jax.ops import xla

FORMULATIONS = ("explicit", "shifted_slices", "grouped", "grouped_nchw")


# Plain autodiff of the xla form's forward formulation (no hand-written gradients).
explicit = xla.shifted_slices_conv
shifted_slices = xla.shifted_slices_depthwise_conv
grouped = reference.depthwise_conv


def grouped_nchw(x, kernel, stride: int, pad: int):
  y = jax.lax.conv_general_dilated(
    jnp.transpose(x, (0, 3, 1, 2)),
    kernel,
    (stride, stride),
    ((pad, pad), (pad, pad)),
    dimension_numbers=("NCHW", "HWIO", "NCHW"),
    feature_group_count=x.shape[-1],
  )
  return jnp.transpose(y, (0, 2, 3, 1))


def with_depthwise(ops: ops_lib.Ops, name: str) -> ops_lib.Ops:
  """`ops` with its depthwise convs computed by formulation `name` (one of FORMULATIONS); named after both."""
  if name not in FORMULATIONS:
    raise ValueError(f"Unknown depthwise formulation {name!r}; use one of {FORMULATIONS}.")
  return dataclasses.replace(ops, name=f"{ops.name}+{name}_depthwise", depthwise_conv=globals()[name])


def contrasting_formulation(ops: ops_lib.Ops) -> str:
  """The formulation to time against `ops`' own depthwise convs: the grouped conv against shifted slices or
  kernels, the xla form's shifted slices against the grouped conv (the reference form)."""
  return "shifted_slices" if ops.depthwise_conv is reference.depthwise_conv else "grouped"
