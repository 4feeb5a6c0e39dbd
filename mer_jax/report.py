"""`python -m mer_jax.report`: the short name of `python -m mer_jax.tools.report` (the command lives there).

python -m mer_jax.report --workdir runs/demo --out runs/demo/report_dev --split dev
"""

import sys

from mer_jax.tools import report

if __name__ == "__main__":
  sys.exit(report.cli())
