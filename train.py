"""Train a consistency model (or its EDM teacher): a thin main over cmjax.training.

    python train.py --config configs/digits_tiny.py --workdir runs/digits [--config.a.b=value ...]

Running the same command again resumes from the latest checkpoint in --workdir.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cmjax.training import NonFiniteLossError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except NonFiniteLossError as err:
        print(f"training stopped: {err}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
