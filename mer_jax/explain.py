"""`python -m mer_jax.explain`: the short name of `python -m mer_jax.tools.explain` (the command lives there).

python -m mer_jax.explain --workdir runs/demo --id dev/dia0_utt0 --out explain.png [--json]
"""

import sys

from mer_jax.tools import explain

if __name__ == "__main__":
  sys.exit(explain.cli())
