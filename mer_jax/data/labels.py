"""Tasks and their class lists: MELD's and MESC's as presets, and the ones a config names (config.data.classes).

Class order is fixed once per task: label ids in prepared data and head outputs both index the list. A config
says which tasks it trains (config.data.tasks) and each task's class names (config.data.classes); the model's
head sizes follow from them (`head_sizes`), so a corpus with its own tasks and classes needs no code edit.
"""

from __future__ import annotations

from mer_jax import errors

EMOTIONS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
SENTIMENTS = ("neutral", "positive", "negative")
# ESConv's eight support strategies, the set MESC annotates; a release with other names sets its own list
# (config.data.classes.strategy). MESC's emotion column uses MELD's seven names.
MESC_STRATEGIES = (
  "question",
  "restatement or paraphrasing",
  "reflection of feelings",
  "self-disclosure",
  "affirmation and reassurance",
  "providing suggestions",
  "information",
  "others",
)

# MELD's tasks; where a run's config has no class list for a task (a config.json older than
# config.data.classes), these are the names its heads were trained with.
TASK_CLASSES = {
  "emotion": EMOTIONS,
  "sentiment": SENTIMENTS,
}

# Values in a label column that mean "no label for this task" (mapped to -1); config.data.no_label_values.
NO_LABEL_VALUES = ("", "undefined", "none", "nan")


def label_key(value) -> str:
  """A label as compared with the class lists: stripped, lower case, single spaces ('Very  High ' -> 'very high')."""
  return " ".join(str(value).strip().lower().split())


def check_class_names(task: str, names, no_label_values=NO_LABEL_VALUES) -> tuple[str, ...]:
  """`names` of `task` as compared with CSV values (`label_key`), in label-id order; InvalidInput when unusable.

  A list needs two classes or more, no two names the same after normalising, and none that means "no label".
  """
  if isinstance(names, str) or not names:
    raise errors.InvalidInput(
      f"config.data.classes.{task} must be a tuple of class names, e.g. "
      f"--config.data.classes.{task}='(\"low\", \"high\")'; got {names!r}."
    )
  keys = tuple(label_key(name) for name in names)
  duplicates = sorted({key for key in keys if keys.count(key) > 1})
  blank = [key for key in keys if key in {label_key(value) for value in no_label_values}]
  problem = None
  if len(keys) < 2:
    problem = "has fewer than 2 classes"
  elif duplicates:
    problem = f"names {duplicates} twice"
  elif blank:
    problem = f"names {blank}, which config.data.no_label_values reads as 'no label'"
  if problem:
    raise errors.InvalidInput(f"config.data.classes.{task} = {tuple(names)!r} {problem}; fix the class list.")
  return keys


def task_classes(data) -> dict[str, tuple[str, ...]]:
  """{task: class names (normalised, label-id order)} for the tasks config.data trains (`data.tasks`).

  Raises InvalidInput naming the override to add when a task has no class list in config.data.classes.
  """
  tasks = tuple(data.tasks)
  if not tasks or len(set(tasks)) != len(tasks):
    raise errors.InvalidInput(
      f"config.data.tasks = {tasks!r}: name each task once, e.g. --config.data.tasks='(\"valence\", \"arousal\")'."
    )
  classes = dict(data.get("classes") or {})
  missing = [task for task in tasks if task not in classes]
  if missing:
    raise errors.InvalidInput(
      f"config.data.classes has no class list for the tasks {missing} of config.data.tasks (it has "
      f"{sorted(classes)}); add one per task, e.g. --config.data.classes.{missing[0]}='(\"low\", \"high\")'."
    )
  no_label_values = tuple(data.get("no_label_values") or NO_LABEL_VALUES)
  return {task: check_class_names(task, classes[task], no_label_values) for task in tasks}


def head_sizes(data) -> dict[str, int]:
  """{task: number of classes}, in config.data.tasks order: the sizes of the model's heads (config.model.tasks)."""
  return {task: len(names) for task, names in task_classes(data).items()}
