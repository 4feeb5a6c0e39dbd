"""Depthwise-convolution formulations for the CPU layout study in benchmarks/run.py.

XLA's CPU backend runs a grouped convolution (`feature_group_count == channels`) through a slow generic
path, its gradients above all. The model (mer_jax/models/mobilenet_v3.py, `DepthwiseConv`) therefore computes
its depthwise convs as a sum of k*k shifted, strided slices times per-channel weights:

    y[n, i, j, c] = sum_{a, b} x_pad[n, s*i + a, s*j + b, c] * w[a, b, 0, c]

`depthwise_formulation(name)` is a context manager (a flax method interceptor) that re-routes every
depthwise conv traced inside it, whichever way the model spells it (`mobilenet_v3.DepthwiseConv`, or an
`nn.Conv` with one group per channel), to one formulation:

  'explicit'      shifted slices, plain autodiff (the model's forward; the model's own gradients,
                  `mobilenet_v3.depthwise_input_grad` and `depthwise_kernel_grad`, are what the plain
                  `train` op times)
  'grouped'       lax.conv_general_dilated, NHWC, feature_group_count = C
  'grouped_nchw'  the same on NCHW (transposes in and out)

Each reads the very same `kernel` parameter (kh, kw, 1, C), so parameters, initialisation and outputs
are unchanged (up to float32 summation order): the benchmark can time the real train step each way.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mer_jax.models import mobilenet_v3

FORMULATIONS = ("explicit", "grouped", "grouped_nchw")


# Plain autodiff of the model's forward formulation (no hand-written gradients).
explicit = mobilenet_v3.shifted_slices_conv


def grouped(x, kernel, stride: int, pad: int):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1])


def grouped_nchw(x, kernel, stride: int, pad: int):
  y = jax.lax.conv_general_dilated(jnp.transpose(x, (0, 3, 1, 2)), kernel, (stride, stride),
                                   ((pad, pad), (pad, pad)), dimension_numbers=("NCHW", "HWIO", "NCHW"),
                                   feature_group_count=x.shape[-1])
  return jnp.transpose(y, (0, 2, 3, 1))


def _depthwise_call(module, inputs):
  """(kernel, stride, pad) when `module(inputs)` is a depthwise conv we can re-route, else None."""
  if not module.has_variable("params", "kernel"):
    return None  # init: let the module create its parameters its own way
  model_class = getattr(mobilenet_v3, "DepthwiseConv", None)
  if model_class is not None and type(module) is model_class:
    kernel_size = module.kernel_size
    return module.get_variable("params", "kernel"), module.stride, (kernel_size - 1) // 2
  if type(module) is not nn.Conv or getattr(inputs, "ndim", 0) != 4 or module.use_bias:
    return None
  channels, kernel_size = inputs.shape[-1], tuple(module.kernel_size)
  strides = module.strides if module.strides is not None else 1
  strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
  pad = (kernel_size[0] - 1) // 2
  padding = module.padding
  if (channels == 1 or module.feature_group_count != channels or module.features != channels
      or len(kernel_size) != 2 or kernel_size[0] != kernel_size[1] or strides[0] != strides[1]
      or padding not in (((pad, pad), (pad, pad)), [(pad, pad), (pad, pad)], pad)
      or module.kernel_dilation not in (None, 1, (1, 1)) or module.input_dilation not in (None, 1, (1, 1))):
    return None
  return module.get_variable("params", "kernel"), strides[0], pad


def _interceptor(formulation, next_fun, args, kwargs, context):
  if context.method_name != "__call__" or not args:
    return next_fun(*args, **kwargs)
  call = _depthwise_call(context.module, args[0])
  if call is None:
    return next_fun(*args, **kwargs)
  kernel, stride, pad = call
  dtype = context.module.dtype or jnp.float32
  return formulation(args[0].astype(dtype), kernel.astype(dtype), stride, pad)


@contextlib.contextmanager
def depthwise_formulation(name: str):
  """Inside: every depthwise conv traces as formulation `name` (one of FORMULATIONS)."""
  if name not in FORMULATIONS:
    raise ValueError(f"Unknown depthwise formulation {name!r}; use one of {FORMULATIONS}.")
  with nn.intercept_methods(functools.partial(_interceptor, globals()[name])):
    yield


def with_formulation(fn, name: str):
  """`fn` traced under `depthwise_formulation(name)` (wrap before jax.jit)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with depthwise_formulation(name):
      return fn(*args, **kwargs)
  return wrapped
