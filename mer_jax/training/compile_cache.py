"""JAX's persistent compilation cache, and the timed compile of a step that says whether the cache served it.

A restart, or a second run of the same config, loads its compiled steps from the cache instead of compiling
them again (the edge model's train step: 97-104 s of compiling on an H200, ~50 s on a 2-core CPU for the tiny
config). The entry point turns the cache on (`enable`, before the first compile); the library only reports.
Entries are keyed by the program, the compile options (XLA_FLAGS included), the devices and the jax/jaxlib
versions, so a changed model or flag compiles afresh. XLA:CPU executables are cached too (jax 0.10.2), the
cpu_ffi form's custom calls included: its kernels are registered with XLA (when the form is chosen) before the
cached executable is loaded. In a job of several processes only process 0 writes entries; every process reads them, so
a directory all hosts can read (gs://bucket/..., a shared filesystem) serves a whole pod.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import threading
import time
from typing import Any

# Programs that compile faster than this are not written: the small jits (key, init) would only add files, and
# on gs:// a write costs a round trip. The train and eval steps take seconds to minutes.
MIN_COMPILE_SECONDS = 0.5
# A local cache folder's size limit: a train step's entry is ~5 MB (tiny config, CPU), the edge model's more.
LOCAL_MAX_BYTES = 4 * 2**30
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def default_dir() -> str:
  """$MER_JAX_CACHE/jax_compilation_cache (MER_JAX_CACHE defaults to ~/.cache/mer_jax, as in configs/)."""
  cache = os.path.abspath(os.path.expanduser(os.environ.get("MER_JAX_CACHE", "~/.cache/mer_jax")))
  return os.path.join(cache, "jax_compilation_cache")


def enable(directory: str) -> str:
  """Turns JAX's persistent compilation cache on in `directory` (a local path or a URL such as gs://bucket/jax_cache);
  '' turns it off. Call before the first compile. Returns the log line that says which."""
  import jax

  if not directory:
    jax.config.update("jax_enable_compilation_cache", False)
    return "Persistent compilation cache: off (--compilation_cache_dir='')."
  limit = ""
  if "://" not in directory:
    directory = os.path.abspath(os.path.expanduser(directory))
    # A local folder keeps the most recently used entries (JAX's LRU eviction needs filelock); a bucket grows.
    if importlib.util.find_spec("filelock") is not None:
      jax.config.update("jax_compilation_cache_max_size", LOCAL_MAX_BYTES)
      limit = f", least recently used dropped beyond {LOCAL_MAX_BYTES / 2**30:.0f} GiB"
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return (
    f"Persistent compilation cache: {directory} (programs compiling in >= {MIN_COMPILE_SECONDS} s are kept{limit})."
  )


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """How a step was compiled: seconds spent tracing + lowering it, seconds compiling it (or loading it), and where
  it came from: 'compiled', 'persistent cache' or 'memory' (compiled earlier in this process)."""

  lower_seconds: float
  compile_seconds: float
  source: str

  @property
  def from_cache(self) -> bool:
    return self.source == "persistent cache"

  def describe(self, name: str) -> str:
    source = {
      "compiled": "compiled by XLA, not loaded from the persistent cache",
      "persistent cache": "loaded from the persistent compilation cache",
      "memory": "compiled earlier in this process",
    }[self.source]
    lowered = f"traced and lowered in {self.lower_seconds:.1f} s"
    return f"Compiled the {name} in {self.compile_seconds:.1f} s ({source}; {lowered})."


def compile_timed(jitted, *args) -> tuple[Any, CompileReport]:
  """`jitted.lower(*args).compile()`, timed -> (the compiled step, CompileReport). Calling `jitted` afterwards with
  arguments of the same shapes and shardings reuses this executable (no second compile)."""
  from jax import monitoring

  thread, seen = threading.get_ident(), set()

  def on_event(event: str, *_, **__) -> None:
    if threading.get_ident() == thread:  # this compile, not another thread's
      seen.add(event)

  monitoring.register_event_listener(on_event)
  monitoring.register_event_duration_secs_listener(on_event)
  try:
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
  finally:
    monitoring.unregister_event_listener(on_event)
    monitoring.unregister_event_duration_listener(on_event)
  if _CACHE_HIT_EVENT in seen:
    source = "persistent cache"
  elif _BACKEND_COMPILE_EVENT in seen:
    source = "compiled"
  else:
    source = "memory"
  return compiled, CompileReport(lowered_at - start, done - lowered_at, source)
