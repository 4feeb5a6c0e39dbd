"""mer_jax.training.host_memory: the malloc settings added to an environment, a real restart, and what they are for."""

import os
import subprocess
import sys

import pytest

from mer_jax.training import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCMALLOC = host_memory.find_tcmalloc()


def test_environment_prefers_tcmalloc_then_huge_pages(monkeypatch):
  monkeypatch.setattr(host_memory, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
  monkeypatch.setattr(host_memory, "huge_pages_supported", lambda: True)
  got = host_memory.environment({"A": "1", "LD_PRELOAD": "/lib/libother.so"})
  assert got["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4:/lib/libother.so" and got["A"] == "1"
  assert got["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40) and "GLIBC_TUNABLES" not in got
  # Asked for huge pages, or no tcmalloc installed: the tunable, with the other tunables kept.
  got = host_memory.environment({"MER_JAX_MALLOC": "hugepages", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert got["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and "LD_PRELOAD" not in got
  monkeypatch.setattr(host_memory, "find_tcmalloc", lambda: None)
  assert host_memory.environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  # The user's own choice wins; `system` and an unsupported system leave the environment as it is.
  for mine in ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {"LD_PRELOAD": "/opt/libjemalloc.so.2"},
               {"MER_JAX_MALLOC": "system"}):
    assert host_memory.environment(mine) == mine
  monkeypatch.setattr(host_memory, "huge_pages_supported", lambda: False)
  assert host_memory.environment({"A": "1"}) == {"A": "1"}
  with pytest.raises(ValueError, match="MER_JAX_MALLOC='jemalloc': use one of auto, tcmalloc"):
    host_memory.environment({"MER_JAX_MALLOC": "jemalloc"})


def test_without_fast_malloc_keeps_everything_else():
  environ = {"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4:/lib/libother.so", "B": "2",
             "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2", "MER_JAX_MALLOC_RESTARTED": "1"}
  assert host_memory.without_fast_malloc(environ) == {
      "LD_PRELOAD": "/lib/libother.so", "B": "2", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  assert host_memory.without_fast_malloc({"LD_PRELOAD": "/lib/libtcmalloc.so.4", "B": "2"}) == {"B": "2"}


def _run(code: str, **environ) -> str:
  env = host_memory.without_fast_malloc(os.environ)
  env.pop(host_memory.CHOICE, None)
  env.update(environ, PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          check=True)
  return result.stdout


RESTART = ("import os, sys; print('start', os.environ.get('{variable}'), sys.argv[1:], flush=True); "
           "from mer_jax import host_memory; host_memory.restart_with_fast_malloc(); "
           "print('running', host_memory.describe())")


@pytest.mark.skipif(not TCMALLOC, reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_restart_loads_tcmalloc_once():
  lines = _run(RESTART.format(variable="LD_PRELOAD")).splitlines()
  # The first start has no LD_PRELOAD, restarts (same command line) and runs once with tcmalloc mapped.
  assert lines == ["start None []", f"start {TCMALLOC} []", "running tcmalloc"]
  assert _run(RESTART.format(variable="LD_PRELOAD"), MER_JAX_MALLOC="system").splitlines() == [
      "start None []", "running glibc"]


@pytest.mark.skipif(not host_memory.huge_pages_supported(), reason="needs Linux, glibc >= 2.35 and huge pages")
def test_restart_sets_the_huge_page_tunable_once():
  lines = _run(RESTART.format(variable="GLIBC_TUNABLES"), MER_JAX_MALLOC="hugepages").splitlines()
  assert lines == ["start None []", "start glibc.malloc.hugetlb=1 []", "running glibc, huge pages"]


# libc's malloc and free, as XLA calls them for each execution's temporaries (numpy would ask for huge
# pages on its own). A 256 MiB buffer is written, freed, and a second one written: the page faults of
# the second are what every train step after the first pays.
SECOND_BUFFER_FAULTS = (
    "import ctypes, resource; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; "
    "libc.free.argtypes = [ctypes.c_void_p]; size = 1 << 28; first = libc.malloc(size); "
    "ctypes.memset(first, 1, size); libc.free(first); "
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; second = libc.malloc(size); "
    "ctypes.memset(second, 1, size); print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")


def test_every_large_buffer_faults_its_pages_with_the_system_malloc():
  assert int(_run(SECOND_BUFFER_FAULTS)) > 60_000  # 256 MiB / 4 KiB = 65,536


@pytest.mark.skipif(not TCMALLOC, reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_tcmalloc_reuses_the_freed_buffer():
  assert int(_run(SECOND_BUFFER_FAULTS, LD_PRELOAD=TCMALLOC)) < 1_000


@pytest.mark.skipif(not host_memory.huge_pages_supported(), reason="needs Linux, glibc >= 2.35 and huge pages")
def test_huge_pages_fault_far_fewer_pages():
  assert int(_run(SECOND_BUFFER_FAULTS, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")) < 65_536 / 4


def test_shell_exports(monkeypatch, capsys):
  monkeypatch.setattr(host_memory, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
  for key in ("LD_PRELOAD", "GLIBC_TUNABLES", "MER_JAX_MALLOC", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"):
    monkeypatch.delenv(key, raising=False)
  host_memory.main()
  assert capsys.readouterr().out.splitlines() == [
      "export LD_PRELOAD=/lib/libtcmalloc_minimal.so.4",
      f"export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD={1 << 40}"]
