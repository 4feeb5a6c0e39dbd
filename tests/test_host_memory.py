"""mer_jax.host_memory: the huge-page malloc tunable, added to an environment and set by a real restart."""

import os
import subprocess
import sys

import pytest

from mer_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_environment_gets_the_tunable_and_keeps_the_others(monkeypatch):
  monkeypatch.setattr(host_memory, "supported", lambda: True)
  assert host_memory.environment_with_huge_pages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  got = host_memory.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert got["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # A value the user chose wins; the opt-out and an unsupported system leave the environment as it is.
  mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
  assert host_memory.is_set(mine) and host_memory.environment_with_huge_pages(mine) == mine
  assert host_memory.environment_with_huge_pages({"MER_JAX_HUGE_PAGES": "0"}) == {"MER_JAX_HUGE_PAGES": "0"}
  monkeypatch.setattr(host_memory, "supported", lambda: False)
  assert host_memory.environment_with_huge_pages({"A": "1"}) == {"A": "1"}


def _run(code: str, **environ) -> str:
  env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", "MER_JAX_HUGE_PAGES")}
  env.update(environ, PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          check=True)
  return result.stdout


@pytest.mark.skipif(not host_memory.supported(), reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_reexec_restarts_the_process_once_with_the_tunable():
  code = ("import os, sys; print('start', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True); "
          "from mer_jax import host_memory; host_memory.reexec_with_huge_pages(); print('running')")
  lines = _run(code).splitlines()
  # The first start prints without the tunable, restarts (same command line) and runs once with it.
  assert lines == ["start None []", "start glibc.malloc.hugetlb=1 []", "running"]
  assert _run(code, MER_JAX_HUGE_PAGES="0").splitlines() == ["start None []", "running"]


@pytest.mark.skipif(not host_memory.supported(), reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_large_buffers_fault_far_fewer_pages_with_the_tunable():
  """What the tunable is for: a 256 MiB buffer malloc'd and written (as XLA does for each execution's
  temporaries) faults 4 KiB pages without it and 2 MiB pages with it."""
  # libc's malloc itself, as XLA calls it (numpy would ask for huge pages on its own).
  code = ("import ctypes, resource; libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p; "
          "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; buffer = libc.malloc(1 << 28); "
          "ctypes.memset(buffer, 1, 1 << 28); print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
  small_pages = int(_run(code, MER_JAX_HUGE_PAGES="0"))
  huge_pages = int(_run(code, GLIBC_TUNABLES="glibc.malloc.hugetlb=1"))
  assert small_pages > 60_000  # 256 MiB / 4 KiB = 65,536
  assert huge_pages < small_pages / 4
