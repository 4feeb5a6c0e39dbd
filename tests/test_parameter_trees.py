"""Every config's parameter layout (`params`, `batch_stats`: paths, shapes, dtypes) equals the listing in
tests/fixtures/parameter_trees.json, so checkpoints written by earlier code still load.

The listing was generated from the code before the subpackage/ops-seam refactor (commit 3e409a4); see
tests/fixtures/make_parameter_trees.py for when and how to regenerate it.
"""

import json
import os

import pytest

from mer_jax import ops as ops_lib
from tests.fixtures import make_parameter_trees as trees_lib

REGENERATE = "JAX_PLATFORMS=cpu python tests/fixtures/make_parameter_trees.py --configs {name}"
CONFIG_NAMES = trees_lib.config_names()


@pytest.fixture(scope="module")
def expected_trees():
  with open(trees_lib.OUT) as f:
    return json.load(f)


def differences(expected: dict, actual: dict) -> list[str]:
  """One line per leaf that is missing, extra, or of another shape or dtype, per collection."""
  lines = []
  for collection in sorted(set(expected) | set(actual)):
    old, new = expected.get(collection, {}), actual.get(collection, {})
    for path in sorted(set(old) | set(new)):
      if path not in new:
        lines.append(f"{collection}/{path}: missing now (was {old[path]})")
      elif path not in old:
        lines.append(f"{collection}/{path}: new {new[path]}")
      elif old[path] != new[path]:
        lines.append(f"{collection}/{path}: was {old[path]}, now {new[path]}")
  return lines


def test_listing_has_no_removed_configs(expected_trees):
  stale = sorted(set(expected_trees) - set(CONFIG_NAMES))
  assert not stale, (
    f"tests/fixtures/parameter_trees.json lists configs that configs/ no longer has: {stale}; "
    "remove their entries from the JSON."
  )


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_parameter_tree_unchanged(name, expected_trees):
  assert name in expected_trees, (
    f"configs/{name}.py has no listing in tests/fixtures/parameter_trees.json. Add it (once its layout is "
    f"final) with: {REGENERATE.format(name=name)}"
  )
  diff = differences(expected_trees[name], trees_lib.parameter_tree(name))
  assert not diff, (
    f"configs/{name}.py: the parameter layout changed, so earlier checkpoints will not load "
    f"({len(diff)} leaves differ):\n  " + "\n  ".join(diff[:50])
  )


@pytest.mark.parametrize("form", sorted(ops_lib.FORMS))
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_ops_form_has_the_same_tree(name, form, expected_trees):
  """The ops forms change how layers compute, never their parameters: a checkpoint loads under any form."""
  if name not in expected_trees:
    pytest.skip(f"configs/{name}.py has no listing (test_parameter_tree_unchanged fails for it)")
  diff = differences(expected_trees[name], trees_lib.parameter_tree(name, ops=ops_lib.FORMS[form]))
  assert not diff, (
    f"configs/{name}.py with ops form {form!r}: the parameter layout differs from the listing "
    f"({len(diff)} leaves):\n  " + "\n  ".join(diff[:50])
  )


def test_differences_names_the_paths():
  expected = {"params": {"a/kernel": [[2, 3], "float32"], "b/bias": [[3], "float32"]}, "batch_stats": {}}
  actual = {"params": {"a/kernel": [[2, 4], "float32"], "c/bias": [[3], "float32"]}, "batch_stats": {}}
  assert differences(expected, actual) == [
    "params/a/kernel: was [[2, 3], 'float32'], now [[2, 4], 'float32']",
    "params/b/bias: missing now (was [[3], 'float32'])",
    "params/c/bias: new [[3], 'float32']",
  ]
  assert differences(expected, expected) == []


def test_listing_is_written_by_the_generator(expected_trees):
  """The committed file is in the generator's format (so a regeneration's diff shows only real changes)."""
  with open(trees_lib.OUT) as f:
    assert f.read() == trees_lib.dumps(expected_trees)
  assert os.path.getsize(trees_lib.OUT) < 500_000
