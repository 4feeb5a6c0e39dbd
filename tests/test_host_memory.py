"""mer_jax.training.host_memory: the opt-in malloc settings, the exports a shell reads, and no process restarts."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from mer_jax.training import host_memory
from tests.conftest import REQUIRE_TCMALLOC, skip_or_fail

REPO = pathlib.Path(__file__).resolve().parents[1]
DESCRIBE = "from mer_jax.training import host_memory; print(host_memory.describe())"


@pytest.fixture
def tcmalloc() -> str:
  """The installed tcmalloc's path; skips without one (fails where CI asks for it: MER_JAX_REQUIRE_TCMALLOC)."""
  path = host_memory.find_tcmalloc()
  if not path:
    skip_or_fail("tcmalloc is not installed (apt-get install libtcmalloc-minimal4)", REQUIRE_TCMALLOC)
  return path


@pytest.fixture
def huge_pages():
  if not host_memory.huge_pages_supported():
    pytest.skip("needs Linux, glibc >= 2.35 and transparent huge pages")


def _plain_env(**environ) -> dict[str, str]:
  """This environment without any fast malloc or MER_JAX_MALLOC, plus `environ`."""
  env = host_memory.without_fast_malloc(os.environ)
  env.pop(host_memory.CHOICE, None)
  env.update(environ)
  return env


def _run(argv, env, **kwargs) -> subprocess.CompletedProcess:
  # cwd: the repository, where `python -c` finds mer_jax even when it is not installed.
  return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, **kwargs)


def _python(code: str, **environ) -> str:
  return _run([sys.executable, "-c", code], _plain_env(**environ), check=True).stdout


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
  assert host_memory.environment({"MER_JAX_MALLOC": "tcmalloc"}) == {"MER_JAX_MALLOC": "tcmalloc"}  # not installed
  # The user's own choice wins; `system` and an unsupported system leave the environment as it is.
  for mine in (
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
    {"LD_PRELOAD": "/opt/libjemalloc.so.2"},
    {"MER_JAX_MALLOC": "system"},
  ):
    assert host_memory.environment(mine) == mine
  monkeypatch.setattr(host_memory, "huge_pages_supported", lambda: False)
  assert host_memory.environment({"A": "1"}) == {"A": "1"}
  with pytest.raises(ValueError, match="MER_JAX_MALLOC='jemalloc': use one of auto, tcmalloc"):
    host_memory.environment({"MER_JAX_MALLOC": "jemalloc"})


def test_without_fast_malloc_keeps_everything_else():
  environ = {
    "LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4:/lib/libother.so",
    "B": "2",
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2",
  }
  assert host_memory.without_fast_malloc(environ) == {
    "LD_PRELOAD": "/lib/libother.so",
    "B": "2",
    "GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
  }
  assert host_memory.without_fast_malloc({"LD_PRELOAD": "/lib/libtcmalloc.so.4", "B": "2"}) == {"B": "2"}


def test_describe_names_the_malloc_the_process_started_with():
  assert _python(DESCRIBE).strip() == "glibc"


def test_describe_sees_preloaded_tcmalloc(tcmalloc):
  assert _python(DESCRIBE, LD_PRELOAD=tcmalloc).strip() == "tcmalloc"


def test_describe_sees_huge_pages(huge_pages):
  assert _python(DESCRIBE, GLIBC_TUNABLES="glibc.malloc.hugetlb=1").strip() == "glibc, huge pages"


def test_advice_says_what_is_left_to_gain(monkeypatch):
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.setattr(host_memory, "describe", lambda: "glibc")
  monkeypatch.setattr(host_memory, "huge_pages_supported", lambda: True)
  monkeypatch.setattr(host_memory, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
  opt_in = 'eval "$(python -m mer_jax.training.host_memory)"'
  installed = host_memory.advice({})
  assert opt_in in installed and "378 -> ~245 ms" in installed and "docs/PERFORMANCE.md" in installed
  assert "apt-get" not in installed and "\n" not in installed
  monkeypatch.setattr(host_memory, "find_tcmalloc", lambda: None)
  missing = host_memory.advice({})
  assert "apt-get install libtcmalloc-minimal4" in missing and opt_in in missing and "~270 ms" in missing
  monkeypatch.setattr(host_memory, "huge_pages_supported", lambda: False)
  assert "huge pages" not in host_memory.advice({})
  # Nothing to say when the user chose (or turned it off), or when a fast malloc already runs.
  for chosen in (
    {"MER_JAX_MALLOC": "system"},
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
    {"LD_PRELOAD": "/opt/libjemalloc.so.2"},
  ):
    assert host_memory.advice(chosen) == ""
  for running in ("tcmalloc", "glibc, huge pages"):
    monkeypatch.setattr(host_memory, "describe", lambda running=running: running)
    assert host_memory.advice({}) == ""
  monkeypatch.setattr(host_memory, "describe", lambda: "glibc")
  assert "MER_JAX_MALLOC='x'" in host_memory.advice({"MER_JAX_MALLOC": "x"})  # a typo is logged, not raised


def test_exports_quote_values_for_the_shell(monkeypatch, capsys):
  """main()'s lines, read back by a real shell: the values arrive intact, even with spaces and quotes."""
  odd = "/opt/my libs/it's/libtcmalloc_minimal.so.4"
  monkeypatch.setattr(host_memory, "find_tcmalloc", lambda: odd)
  for key in ("LD_PRELOAD", "GLIBC_TUNABLES", "MER_JAX_MALLOC", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"):
    monkeypatch.delenv(key, raising=False)
  host_memory.main([])
  printed = capsys.readouterr().out
  assert [line.split("=")[0] for line in printed.splitlines()] == [
    "export LD_PRELOAD",
    "export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD",
  ]
  shell = _run(
    ["sh", "-c", 'eval "$1"; printf "%s\\n%s" "$LD_PRELOAD" "$TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"', "sh", printed],
    _plain_env(),
    check=True,
  )
  assert shell.stdout.splitlines() == [odd, str(1 << 40)]


def _opt_in_then(code: str, **environ) -> subprocess.CompletedProcess:
  """`eval "$(python -m mer_jax.training.host_memory)"` in a shell, then Python `code` started from it."""
  script = f'eval "$("$1" -m mer_jax.training.host_memory)" && exec "$1" -c "$2"'
  return _run(["sh", "-c", script, "sh", sys.executable, code], _plain_env(**environ), check=True)


def test_opt_in_from_the_shell_loads_tcmalloc(tcmalloc):
  assert _opt_in_then(DESCRIBE).stdout.strip() == "tcmalloc"


def test_opt_in_from_the_shell_sets_huge_pages(huge_pages):
  assert _opt_in_then(DESCRIBE, MER_JAX_MALLOC="hugepages").stdout.strip() == "glibc, huge pages"


def test_nothing_to_export_says_why_on_stderr_only():
  result = _run([sys.executable, "-m", "mer_jax.training.host_memory"], _plain_env(MER_JAX_MALLOC="system"), check=True)
  assert result.stdout == "" and "MER_JAX_MALLOC=system: nothing to export" in result.stderr


# libc's malloc and free, as XLA calls them for each execution's temporaries (numpy would ask for huge
# pages on its own). A 256 MiB buffer is written, freed, and a second one written: the page faults of
# the second are what every train step after the first pays.
SECOND_BUFFER_FAULTS = (
  "import ctypes, resource; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; "
  "libc.free.argtypes = [ctypes.c_void_p]; size = 1 << 28; first = libc.malloc(size); "
  "ctypes.memset(first, 1, size); libc.free(first); "
  "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; second = libc.malloc(size); "
  "ctypes.memset(second, 1, size); print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"
)


def test_every_large_buffer_faults_its_pages_with_the_system_malloc():
  assert int(_python(SECOND_BUFFER_FAULTS)) > 60_000  # 256 MiB / 4 KiB = 65,536


def test_tcmalloc_reuses_the_freed_buffer(tcmalloc):
  assert int(_python(SECOND_BUFFER_FAULTS, LD_PRELOAD=tcmalloc)) < 1_000


def test_huge_pages_fault_far_fewer_pages(huge_pages):
  assert int(_python(SECOND_BUFFER_FAULTS, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")) < 65_536 / 4


def test_launch_starts_once_and_says_how_to_opt_in(tmp_path):
  """launch.py runs in the process it was started in (no restart with LD_PRELOAD / GLIBC_TUNABLES) and logs one
  line on the malloc. A sitecustomize prints a line each time an interpreter starts."""
  (tmp_path / "sitecustomize.py").write_text(
    "import os, sys\n"
    "print('interpreter start', os.getpid(), os.environ.get('LD_PRELOAD'), os.environ.get('GLIBC_TUNABLES'),\n"
    "      file=sys.stderr, flush=True)\n"
  )
  # No prepared data and no way to make it: launch.py logs its set-up lines, then exits 2 (before any training).
  argv = [
    sys.executable,
    "launch.py",
    "--config",
    "configs/tiny.py",
    f"--workdir={tmp_path / 'work'}",
    f"--config.data.data_dir={tmp_path / 'no_data'}",
  ]
  result = _run(argv, _plain_env(PYTHONPATH=str(tmp_path)))
  log = result.stderr
  starts = re.findall(r"^interpreter start .*$", log, re.M)
  assert len(starts) == 1 and starts[0].endswith(" None None"), log[-3000:]
  malloc_lines = re.findall(r"Host malloc: .*", log)
  assert len(malloc_lines) == 1, log[-3000:]
  assert malloc_lines[0].startswith("Host malloc: glibc")
  if host_memory.find_tcmalloc() or host_memory.huge_pages_supported():
    assert 'eval "$(python -m mer_jax.training.host_memory)"' in malloc_lines[0]


def test_no_module_restarts_the_process():
  """No entry point replaces its own process (os.execv*): the faster malloc is the user's opt-in."""
  sources = [REPO / "launch.py", *(REPO / "mer_jax").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
  offenders = [str(path.relative_to(REPO)) for path in sources if re.search(r"\bexecv", path.read_text())]
  assert offenders == []


def test_skip_or_fail_fails_only_where_the_switch_asks(monkeypatch):
  """tests/conftest.py's helper, which the tcmalloc tests above use: CI's switch turns a skip into a failure."""
  for value in ("", "0"):
    monkeypatch.setenv(REQUIRE_TCMALLOC, value)
    with pytest.raises(pytest.skip.Exception, match="no tcmalloc"):
      skip_or_fail("no tcmalloc", REQUIRE_TCMALLOC)
  monkeypatch.setenv(REQUIRE_TCMALLOC, "1")
  with pytest.raises(pytest.fail.Exception, match="no tcmalloc .MER_JAX_REQUIRE_TCMALLOC is set"):
    skip_or_fail("no tcmalloc", REQUIRE_TCMALLOC)
  monkeypatch.delenv("MER_JAX_REQUIRE_KERNELS", raising=False)
  with pytest.raises(pytest.skip.Exception):  # the other switch is not set
    skip_or_fail("no compiler")
