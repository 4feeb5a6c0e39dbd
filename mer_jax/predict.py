"""`python -m mer_jax.predict`: predict on one clip or a folder of clips (the CLI is mer_jax/tools/predict.py).

python -m mer_jax.predict --model runs/demo --folder clips/ [--csv dev_sent_emo.csv] --out predictions/
python -m mer_jax.predict --model runs/demo --video clip.mp4 --text "Oh my God!"
"""

import sys

from mer_jax.tools import predict

if __name__ == "__main__":
  sys.exit(predict.cli())
