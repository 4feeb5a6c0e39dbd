"""Shared test set-up: quiet TensorFlow, keep JAX on the CPU, and skip-or-fail for tests that need a system package.

Run from the repository root (`python -m pytest`): python -m puts it on sys.path, which finds the top-level
`configs` and `data` packages; mer_jax itself is installed (`pip install --no-deps -e .`).
"""

import os
import shutil

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Switches for CI (.ci/run sets both): a test that needs a system package fails instead of skipping without it.
REQUIRE_KERNELS = "MER_JAX_REQUIRE_KERNELS"  # a C++ compiler, so that the CPU kernels build (g++)
REQUIRE_TCMALLOC = "MER_JAX_REQUIRE_TCMALLOC"  # tcmalloc (libtcmalloc-minimal4)
REQUIRE_BROWSER = "MER_JAX_REQUIRE_BROWSER"  # a headless Chromium (Debian: chromium-headless-shell), for gallery.html
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
# No sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars")


def skip_or_fail(reason: str, switch: str = REQUIRE_KERNELS):
  """Skip the test for `reason`, or fail it when `switch` is set (to anything but '' or '0'): where CI installed
  the package, a missing one is a broken set-up, not a reason to test less."""
  if os.environ.get(switch, "").strip() not in ("", "0"):
    pytest.fail(f"{reason} ({switch} is set, so this fails instead of skipping)", pytrace=False)
  pytest.skip(reason)


def _form(name: str):
  from mer_jax import ops
  from mer_jax.ops.cpu import build

  if name == "cpu_ffi" and not build.available():
    skip_or_fail(f"the CPU kernels cannot be built here: {build.unavailable_reason()}", REQUIRE_KERNELS)
  return ops.FORMS[name]


@pytest.fixture(params=["xla", "cpu_ffi"])
def non_reference_form(request):
  """The ops forms that tests hold against the reference form."""
  return _form(request.param)


@pytest.fixture(params=["reference", "xla", "cpu_ffi"])
def ops_form(request):
  """Runs a test with each ops form (mer_jax.ops.FORMS): the reference, the XLA:CPU form and the C++ kernels (where
  this machine can build them)."""
  return _form(request.param)


@pytest.fixture(scope="session")
def headless_browser() -> list[str]:
  """The command line start of a headless Chromium (the first of BROWSERS on PATH) that opens pages from disk."""
  for name in BROWSERS:
    path = shutil.which(name)
    if path:
      return [path, *BROWSER_FLAGS]
  skip_or_fail(
    f"no headless Chromium on PATH ({', '.join(BROWSERS)}): apt-get install chromium-headless-shell", REQUIRE_BROWSER
  )
