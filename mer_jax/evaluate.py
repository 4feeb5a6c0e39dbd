"""`python -m mer_jax.evaluate`: the short name of `python -m mer_jax.tools.evaluate` (the command lives there).

python -m mer_jax.evaluate --workdir runs/meld_text --csv dev_sent_emo.csv [--clips FOLDER] [--json]
"""

import sys

from mer_jax.tools import evaluate

if __name__ == "__main__":
  sys.exit(evaluate.cli())
