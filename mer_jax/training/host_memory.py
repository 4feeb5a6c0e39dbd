"""Host malloc for XLA:CPU, opt-in: tcmalloc when it is installed, else glibc's transparent-huge-page tunable.

XLA:CPU mallocs each execution's temporary buffer and frees it when the execution ends: 666 MB for the edge
model's train step at batch 32. glibc serves an allocation that large with a fresh `mmap` and returns it
with `munmap`, so every step maps and zeroes its pages afresh in the kernel. Two fixes, best first (measured
in docs/PERFORMANCE.md):

- tcmalloc (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`) keeps freed memory mapped and hands the
  same pages back next step: ~100 page faults per step. It has to be loaded before anything else, through
  `LD_PRELOAD`.
- `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35): malloc asks for transparent huge pages, and a
  step faults ~750 2 MiB pages instead.

Both are read when a process starts, and the library never restarts a process to set them: the user opts in
with `eval "$(python -m mer_jax.training.host_memory)"` (or `mer-jax-host-memory`) before starting Python,
which prints the exports `environment()` adds. `MER_JAX_MALLOC` chooses what it prints: `auto` (default:
tcmalloc if found, else huge pages), `tcmalloc`, `hugepages` or `system` (nothing). A malloc the user preloads,
or a hugetlb tunable the user sets, wins. `advice()` is the log line saying what is left to gain;
`environment()` also serves benchmarks that start worker processes.
"""

from __future__ import annotations

import argparse
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
LIBRARY_DIRS = (
  "/usr/lib/x86_64-linux-gnu",
  "/usr/lib/aarch64-linux-gnu",
  "/usr/lib64",
  "/usr/lib",
  "/usr/local/lib",
  "/lib/x86_64-linux-gnu",
  "/lib/aarch64-linux-gnu",
)
# tcmalloc prints a line for every allocation over 1 GiB by default; big batches make those routinely.
QUIET_LARGE_ALLOCATIONS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


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


def without_fast_malloc(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
  """A copy of `environ` with tcmalloc taken out of LD_PRELOAD and the hugetlb tunable out of GLIBC_TUNABLES."""
  result = dict(environ)
  for key, keep in (
    ("LD_PRELOAD", lambda item: "tcmalloc" not in item),
    ("GLIBC_TUNABLES", lambda item: item.split("=")[0] != TUNABLE),
  ):
    separator = ":" if key == "GLIBC_TUNABLES" or ":" in environ.get(key, "") else " "
    items = [item for item in environ.get(key, "").split(separator) if item and keep(item)]
    if items:
      result[key] = separator.join(items)
    else:
      result.pop(key, None)
  return result


# Train step at batch 32 on the 2-core CPU, ms (docs/PERFORMANCE.md): for the log line.
STEP_MS = {"glibc": 378, "hugepages": 270, "tcmalloc": 245}
OPT_IN = '`eval "$(python -m mer_jax.training.host_memory)"` before starting Python'


def advice(environ: Mapping[str, str] = os.environ) -> str:
  """One log line: what a faster malloc would gain here and how to opt in. '' when one is in use, when the
  user chose the malloc (`MER_JAX_MALLOC=system` included), or off Linux."""
  if not sys.platform.startswith("linux") or describe() != "glibc":
    return ""
  try:
    if choice(environ) == "system" or user_choice_present(environ):
      return ""
  except ValueError as error:  # a typo in MER_JAX_MALLOC: say so, but it is no reason to stop a training run
    return str(error)
  glibc, tcmalloc, huge_pages = STEP_MS["glibc"], STEP_MS["tcmalloc"], STEP_MS["hugepages"]
  where = "train step at batch 32 on a 2-core CPU, docs/PERFORMANCE.md"
  if find_tcmalloc():
    return f"tcmalloc is installed but not in use: {OPT_IN} preloads it ({glibc} -> ~{tcmalloc} ms per {where})"
  if huge_pages_supported():
    return (
      f"{OPT_IN} gives glibc huge pages ({glibc} -> ~{huge_pages} ms per {where}); "
      f"`apt-get install libtcmalloc-minimal4` first for tcmalloc (~{tcmalloc} ms)"
    )
  return f"`apt-get install libtcmalloc-minimal4`, then {OPT_IN}: {glibc} -> ~{tcmalloc} ms per {where}"


def exports(environ: Mapping[str, str] = os.environ) -> list[str]:
  """The shell `export` lines for what `environment(environ)` adds or changes, values quoted for a POSIX shell."""
  return [
    f"export {key}={shlex.quote(value)}" for key, value in environment(environ).items() if environ.get(key) != value
  ]


def main(argv: list[str] | None = None) -> None:
  """Print the exports that opt in to the faster malloc: `eval "$(python -m mer_jax.training.host_memory)"`."""
  parser = argparse.ArgumentParser(
    prog="python -m mer_jax.training.host_memory",
    description=(
      "Print shell exports that give XLA:CPU a faster malloc (tcmalloc if installed, else glibc's huge "
      f"pages); use: {OPT_IN}. {CHOICE}=auto|tcmalloc|hugepages|system chooses."
    ),
  )
  parser.parse_args(argv)
  lines = exports(dict(os.environ))
  for line in lines:
    print(line)
  if not lines:  # stderr, so that `eval` still gets nothing
    print(
      f"# {CHOICE}={choice()}: nothing to export (already set, chosen by you, or not available here: "
      "tcmalloc needs libtcmalloc-minimal4, huge pages glibc >= 2.35)",
      file=sys.stderr,
    )


if __name__ == "__main__":
  main()
