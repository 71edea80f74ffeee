"""Train a Bayesian diffusion model. See README.md.

    python train.py                                  # default: bundled digits (configs/digits.yaml)
    python train.py fit --config configs/mnist.yaml  # another dataset
    python train.py fit --print_config               # every option, type-checked
"""

from pathlib import Path

from bdiff.console import exit_on_user_error
from bdiff.lit.cli import main

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "digits.yaml"

if __name__ == "__main__":
    exit_on_user_error(lambda: main(DEFAULT_CONFIG))
