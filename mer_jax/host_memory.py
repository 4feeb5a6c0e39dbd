"""Transparent huge pages for XLA:CPU's per-execution buffers, through a glibc malloc tunable.

XLA:CPU mallocs each execution's temporary buffer and frees it when the execution ends: 666 MB for the edge
model's train step at batch 32. glibc serves an allocation that large with a fresh `mmap`, so every step
touched 164,000 new 4 KiB pages, and the kernel spent ~270 ms of CPU per step zeroing and mapping them
(2-core x86 CPU; `strace` showed one mmap/munmap pair per step). With the tunable `glibc.malloc.hugetlb=1`
(glibc >= 2.35), malloc asks for transparent huge pages (`madvise`), a step faults ~750 2 MiB pages
instead, and the train step went from ~430 to ~270 ms (docs/PERFORMANCE.md).

glibc reads tunables once, when the process starts, so an entry point that wants them restarts itself with
`reexec_with_huge_pages()` before doing any work. `MER_JAX_HUGE_PAGES=0` turns this off. In your own
scripts, start Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment instead.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OPT_OUT = "MER_JAX_HUGE_PAGES"
TRANSPARENT_HUGE_PAGES = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported() -> bool:
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


def is_set(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether `environ` already sets the tunable (to any value: a user's own choice wins)."""
  return any(item.split("=")[0] == TUNABLE for item in environ.get("GLIBC_TUNABLES", "").split(":") if item)


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
  return environ.get(OPT_OUT, "1") != "0" and supported()


def environment_with_huge_pages(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
  """A copy of `environ` with the tunable added to GLIBC_TUNABLES (other tunables kept), for a subprocess."""
  environment = dict(environ)
  if wanted(environ) and not is_set(environ):
    existing = environ.get("GLIBC_TUNABLES", "")
    environment["GLIBC_TUNABLES"] = f"{existing}:{SETTING}" if existing else SETTING
  return environment


def reexec_with_huge_pages() -> None:
  """Restart this Python process with the tunable set, unless it is set already, unwanted or unsupported.

  Call it first thing in an entry point (`if __name__ == "__main__":`), never from library code: the
  process is replaced, with the same interpreter and command line (`python -m module` included).
  """
  if is_set() or not wanted():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, list(sys.orig_argv), environment_with_huge_pages())
  except OSError:  # cannot restart (unusual interpreter setup): run on, with 4 KiB pages
    pass
