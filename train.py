"""Train a consistency model (or its EDM teacher): a thin main over cmjax.training.

    python train.py --config configs/digits_tiny.py --workdir runs/digits [--config.a.b=value ...]

Running the same command again resumes from the latest checkpoint in --workdir. The command line
is parsed by cmjax/cli/train.py (also installed as ``cmjax-train``); ``--help`` lists every field.
"""
import sys

from cmjax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
