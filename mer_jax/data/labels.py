"""Task names and class lists shared by the dataset builder, the model heads and evaluation.

Class order is fixed here once: label ids in prepared data and head outputs both index these lists.
"""

EMOTIONS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
SENTIMENTS = ("neutral", "positive", "negative")
# MESC-format emotion columns use the same seven names; strategies vary by dataset release, so a
# MESC-format builder config passes its own list (see data/meld_format.py).

TASK_CLASSES = {
  "emotion": EMOTIONS,
  "sentiment": SENTIMENTS,
}

# Values in a label column that mean "no label for this task" (mapped to -1).
NO_LABEL_VALUES = ("", "undefined", "none", "nan")


def num_classes(task: str, classes: dict | None = None) -> int:
  """Number of classes of `task`, from `classes` (task -> names) or the defaults above."""
  table = classes if classes is not None else TASK_CLASSES
  if task not in table:
    raise KeyError(
      f"Unknown task {task!r}; known tasks: {sorted(table)}. "
      "Add its class list to the config (config.tasks) or to mer_jax/data/labels.py."
    )
  return len(table[task])
