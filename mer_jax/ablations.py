"""`python -m mer_jax.ablations`: the short name of `python -m mer_jax.tools.ablations` (the command lives there).

python -m mer_jax.ablations --config configs/demo.py --workdir-root runs/ablations [--faithfulness]
"""

import sys

from mer_jax.tools import ablations

if __name__ == "__main__":
  sys.exit(ablations.cli())
