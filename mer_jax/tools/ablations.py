"""Ablations: each variant of a config trained with the same budget, then measured like the report.

    python -m mer_jax.tools.ablations --config configs/demo.py --workdir-root R [--steps N] [--only k1,no_gate]
        [--max-examples N] [--set data.data_dir=/path ...]

Every variant trains in R/<variant> through the real `train.train_and_evaluate` (a finished variant is
not trained again: its workdir resumes at the last step), then its best checkpoint is measured on
config.eval_split with `mer_jax.tools.report` (accuracy, weighted F1, selection precision@K against the demo's
ground truth, and the faithfulness gap with --faithfulness). Writes R/ablations.json and R/ablations.md.
The prepared data must exist (`python launch.py --config ...` makes it once).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from typing import Any, Sequence

from mer_jax import errors
from mer_jax import tools

# name -> config overrides (dotted paths). K variants keep everything else; the others keep the config's K.
VARIANTS: dict[str, dict[str, Any]] = {
  "k1": {"model.top_k": 1},
  "k2": {"model.top_k": 2},
  "k4": {"model.top_k": 4},
  "k12": {"model.top_k": 12},
  "no_gate": {"model.use_gate": False},
  "no_reliability": {"model.use_reliability": False},
  "soft_selection": {"model.selection": "soft"},
  "no_text_guidance": {"model.text_guided_selection": False},
}


def set_path(config, path: str, value: Any) -> None:
  """config.<path> = value for a dotted path such as 'model.top_k'; the field must exist."""
  *parents, leaf = path.split(".")
  node = config
  for name in parents:
    if name not in node:
      raise errors.InvalidInput(f"Config has no field {path!r} (no {name!r}); check the spelling.")
    node = node[name]
  if leaf not in node:
    where = ".".join(parents) or "the config"
    raise errors.InvalidInput(
      f"Config has no field {path!r}; check the spelling ({where} has {', '.join(sorted(node))})."
    )
  node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
  """'data.data_dir=/x' -> ('data.data_dir', '/x'); values are Python literals where they parse."""
  if "=" not in text:
    raise errors.InvalidInput(f"--set {text!r}: use --set field.path=value")
  path, raw = text.split("=", 1)
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return path.strip(), value


def variant_config(base, name: str, steps: int | None):
  """A copy of `base` with the variant's overrides and, with `steps`, that training budget."""
  import ml_collections

  config = ml_collections.ConfigDict(base.to_dict())
  for path, value in VARIANTS[name].items():
    set_path(config, path, value)
  if steps is not None:
    config.num_train_steps = int(steps)
    config.stop_after_steps = 0
  return config


def run_variant(
  base, name: str, workdir_root: str, *, steps: int | None, max_examples: int | None, faithfulness: bool, seed: int = 0
) -> dict:
  """Trains one variant (same budget as the others) and measures its best checkpoint -> a table row."""
  from mer_jax.tools import report
  from mer_jax.training import train

  config = variant_config(base, name, steps)
  row: dict[str, Any] = {
    "variant": name,
    "overrides": VARIANTS[name],
    "top_k": int(config.model.top_k),
    "steps": int(config.num_train_steps),
  }
  if config.model.top_k > config.data.num_frames:
    row["skipped"] = f"top_k={config.model.top_k} > num_frames={config.data.num_frames}"
    return row
  workdir = os.path.join(workdir_root, name)
  start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  row["steps"] = int(result["step"])  # the steps the config's epochs resolved to, when --steps is not given
  row["train_seconds"] = round(time.perf_counter() - start, 1)
  result = report.report_run(
    workdir, None, split=config.eval_split, max_examples=max_examples, seed=seed, faithfulness=faithfulness
  )
  task = result["primary_task"]
  faith = result.get("faithfulness") or {}
  row.update(
    {
      "workdir": workdir,
      "split": config.eval_split,
      "num_examples": result["num_examples"],
      "checkpoint_step": result["checkpoint"]["checkpoint_step"],
      "task": task,
      "accuracy": result["tasks"][task]["accuracy"],
      "weighted_f1": result["tasks"][task]["weighted_f1"],
      "precision_at_k": (result["sidecar"] or {}).get("precision_at_k"),
      "precision_at_k_ceiling": (result["sidecar"] or {}).get("precision_at_k_ceiling"),
      "faithfulness_gap": (result["claims"].get("faithfulness_gap") or {}).get("value"),
      "drop_blank_chosen": faith.get("drop_blank_chosen"),
      "drop_blank_random": faith.get("drop_blank_random"),
    }
  )
  return row


def _fmt(value) -> str:
  return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
  lines = [
    "| variant | K | steps | accuracy | weighted F1 | precision@K (ceiling) | faithfulness gap | train s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    if "skipped" in row:
      lines.append(f"| {row['variant']} | {row['top_k']} | - | skipped: {row['skipped']} | | | | |")
      continue
    lines.append(
      f"| {row['variant']} | {row['top_k']} | {row['steps']} | {_fmt(row['accuracy'])} | "
      f"{_fmt(row['weighted_f1'])} | {_fmt(row['precision_at_k'])} ({_fmt(row['precision_at_k_ceiling'])})"
      f" | {_fmt(row['faithfulness_gap'])} | {row['train_seconds']} |"
    )
  return "\n".join(lines) + "\n"


def run_ablations(
  base,
  workdir_root: str,
  variants: Sequence[str],
  *,
  steps: int | None = None,
  max_examples: int | None = None,
  faithfulness: bool = False,
  config_path: str = "",
) -> dict:
  """Runs `variants` one after the other; writes ablations.json and ablations.md under `workdir_root`."""
  from mer_jax.tools import progress
  from mer_jax.training import runs
  from mer_jax.training import train

  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise errors.InvalidInput(f"Unknown ablation variants {unknown}; pass --only with names from {sorted(VARIANTS)}.")
  tools.check_output_folder(workdir_root, "--workdir-root")
  # The data every variant trains on must be prepared already: say so now, not after the first training.
  data_dir = train.resolve_data_dir(base, os.path.join(workdir_root, variants[0]))
  for split in (base.get("train_split", "train"), base.eval_split):
    runs.split_size(base, data_dir, split, flag="config split")
  os.makedirs(workdir_root, exist_ok=True)
  rows = []
  runs_bar = progress.bar(variants, total=len(variants), description="ablations", unit="run")
  for name in runs_bar:
    runs_bar.set_postfix_str(name, refresh=True)
    rows.append(
      run_variant(base, name, workdir_root, steps=steps, max_examples=max_examples, faithfulness=faithfulness)
    )
    summary = {"config": config_path, "steps": steps, "max_examples": max_examples, "variants": rows}
    with open(os.path.join(workdir_root, "ablations.json"), "w") as f:  # after each: a crash keeps the rest
      json.dump(summary, f, indent=1)
  table = markdown_table(rows)
  with open(os.path.join(workdir_root, "ablations.md"), "w") as f:
    f.write(f"# Ablations ({config_path or 'config'}, {steps or 'config'} steps each)\n\n{table}")
  return summary


def main(argv: Sequence[str] | None = None) -> dict:
  from mer_jax.training import runs

  parser = argparse.ArgumentParser(prog="python -m mer_jax.tools.ablations", description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="config file, e.g. configs/demo.py")
  parser.add_argument("--workdir-root", required=True, help="one workdir per variant under it")
  parser.add_argument("--steps", type=int, default=None, help="training steps per variant (default: config's)")
  parser.add_argument("--only", default="", help=f"comma-separated variants (default all: {','.join(VARIANTS)})")
  parser.add_argument("--max-examples", type=int, default=None, help="measure the first N eval examples only")
  parser.add_argument("--faithfulness", action="store_true", help="also measure the blanking gap (3x eval cost)")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="config override, e.g. --set data.data_dir=/data (repeatable)",
  )
  args = parser.parse_args(argv)
  base = runs.load_config(args.config)
  for text in args.set:
    set_path(base, *parse_override(text))
  variants = [v.strip() for v in args.only.split(",") if v.strip()] or list(VARIANTS)
  summary = run_ablations(
    base,
    args.workdir_root,
    variants,
    steps=args.steps,
    max_examples=args.max_examples,
    faithfulness=args.faithfulness,
    config_path=args.config,
  )
  print(markdown_table(summary["variants"]))
  return summary


def cli(argv: Sequence[str] | None = None) -> int:
  """Entry point of `mer-jax-ablations` and `python -m mer_jax.tools.ablations`: exit status 0 when `main` returns,
  2 with one line on stderr for a path or value the user can fix."""
  return tools.run_command(main, argv)


if __name__ == "__main__":
  sys.exit(cli())
