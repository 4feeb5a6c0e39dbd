"""Host malloc for XLA:CPU: tcmalloc when it is installed, else glibc's transparent-huge-page tunable.

XLA:CPU mallocs each execution's temporary buffer and frees it when the execution ends: 666 MB for the edge
model's train step at batch 32. glibc serves an allocation that large with a fresh `mmap` and returns it
with `munmap`, so every step touched 164,000 new 4 KiB pages, and the kernel spent ~270 ms of CPU per step
zeroing and mapping them (2-core x86 CPU, `strace`: one mmap/munmap pair per step). Two fixes, best first:

- tcmalloc (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`) keeps freed memory mapped and hands the
  same pages back next step: ~100 page faults per step, and the step took 0.83-0.98x (median 0.94x) the
  huge-page one's time in five paired runs (docs/PERFORMANCE.md). It has to be loaded before anything else, through `LD_PRELOAD`.
- `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35): malloc asks for transparent huge pages, and a
  step faults ~750 2 MiB pages instead (train step ~430 -> ~270 ms).

Both are read when a process starts, so an entry point calls `restart_with_fast_malloc()` first thing; it
restarts the interpreter once with the environment `environment()` gives. `MER_JAX_MALLOC` chooses:
`auto` (default: tcmalloc if found, else huge pages), `tcmalloc`, `hugepages` or `system` (leave it alone).
A malloc the user preloads, or a hugetlb tunable the user sets, wins. For your own scripts:
`eval "$(python -m mer_jax.training.host_memory)"` prints the same settings as shell exports.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import shlex
import sys
from typing import Mapping

CHOICE = "MER_JAX_MALLOC"
CHOICES = ("auto", "tcmalloc", "hugepages", "system")
TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
TRANSPARENT_HUGE_PAGES = "/sys/kernel/mm/transparent_hugepage/enabled"
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
# tcmalloc prints a line for every allocation over 1 GiB by default; big batches make those routinely.
QUIET_LARGE_ALLOCATIONS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
_RESTARTED = "MER_JAX_MALLOC_RESTARTED"  # at most one restart, whatever the dynamic loader made of the rest


def choice(environ: Mapping[str, str] = os.environ) -> str:
  value = environ.get(CHOICE, "auto").strip().lower() or "auto"
  if value not in CHOICES:
    raise ValueError(f"{CHOICE}={value!r}: use one of {', '.join(CHOICES)}")
  return value


def find_tcmalloc() -> str | None:
  """Path (or soname the dynamic loader knows) of an installed tcmalloc, or None."""
  if not sys.platform.startswith("linux"):
    return None
  for directory in LIBRARY_DIRS:
    for name in TCMALLOC_NAMES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
  for name in ("tcmalloc_minimal", "tcmalloc"):
    soname = ctypes.util.find_library(name)  # the ld.so cache: LD_PRELOAD resolves a bare soname the same way
    if soname:
      return soname
  return None


def huge_pages_supported() -> bool:
  """Linux with glibc >= 2.35 (where the tunable exists) and transparent huge pages not switched off."""
  if not sys.platform.startswith("linux"):
    return False
  library, version = platform.libc_ver()
  if library != "glibc" or tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
    return False
  try:
    with open(TRANSPARENT_HUGE_PAGES) as modes:
      return "[never]" not in modes.read()  # "always" or "madvise": madvise(MADV_HUGEPAGE) is honoured
  except OSError:
    return False


def user_choice_present(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether `environ` already preloads some malloc or sets the hugetlb tunable (to any value)."""
  preloaded = environ.get("LD_PRELOAD", "")
  tunables = environ.get("GLIBC_TUNABLES", "").split(":")
  return "malloc" in preloaded or any(item.split("=")[0] == TUNABLE for item in tunables if item)


def environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
  """A copy of `environ` with the chosen malloc set up (other variables kept), for this or a child process."""
  result = dict(environ)
  wanted = choice(environ)
  if wanted == "system" or user_choice_present(environ):
    return result
  tcmalloc = find_tcmalloc() if wanted in ("auto", "tcmalloc") else None
  if tcmalloc:
    existing = environ.get("LD_PRELOAD", "")
    result["LD_PRELOAD"] = f"{tcmalloc}:{existing}" if existing else tcmalloc
    for key, value in QUIET_LARGE_ALLOCATIONS.items():
      result.setdefault(key, value)
  elif wanted in ("auto", "hugepages") and huge_pages_supported():
    existing = environ.get("GLIBC_TUNABLES", "")
    result["GLIBC_TUNABLES"] = f"{existing}:{SETTING}" if existing else SETTING
  return result


def restart_with_fast_malloc() -> None:
  """Restart this Python process once with `environment()`, unless that changes nothing.

  Call it first thing in an entry point (`if __name__ == "__main__":`), never from library code: the
  process is replaced, with the same interpreter and command line (`python -m module` included).
  """
  if os.environ.get(_RESTARTED):
    return
  wanted = environment()
  if wanted == dict(os.environ):
    return
  wanted[_RESTARTED] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, list(sys.orig_argv), wanted)
  except OSError:  # cannot restart (unusual interpreter setup): run on with the system malloc
    pass


def describe() -> str:
  """This process's malloc, for logs and benchmark records: 'tcmalloc' (or another preloaded malloc's
  name), 'glibc, huge pages' or 'glibc'."""
  try:
    with open("/proc/self/maps") as maps:
      mapped = maps.read()
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
      if name in mapped:
        return name
  except OSError:
    pass
  if SETTING in os.environ.get("GLIBC_TUNABLES", "").split(":"):
    return "glibc, huge pages"
  return "glibc"


HINT = ("the system malloc faults in every step's temporaries again: `apt-get install libtcmalloc-minimal4` "
        "makes CPU training faster (mer_jax/training/host_memory.py)")


def without_fast_malloc(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
  """A copy of `environ` with tcmalloc taken out of LD_PRELOAD and the hugetlb tunable out of GLIBC_TUNABLES."""
  result = dict(environ)
  for key, keep in (("LD_PRELOAD", lambda item: "tcmalloc" not in item),
                    ("GLIBC_TUNABLES", lambda item: item.split("=")[0] != TUNABLE)):
    separator = ":" if key == "GLIBC_TUNABLES" or ":" in environ.get(key, "") else " "
    items = [item for item in environ.get(key, "").split(separator) if item and keep(item)]
    if items:
      result[key] = separator.join(items)
    else:
      result.pop(key, None)
  result.pop(_RESTARTED, None)
  return result


def main() -> None:
  """Print the variables `environment()` adds as shell exports: `eval "$(python -m mer_jax.training.host_memory)"`."""
  current = dict(os.environ)
  for key, value in environment(current).items():
    if current.get(key) != value:
      print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
  main()
