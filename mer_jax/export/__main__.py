"""`python -m mer_jax.export`: export a trained run (see mer_jax/export/exporters.py)."""

import sys

from mer_jax.export import exporters

sys.exit(exporters.cli())
