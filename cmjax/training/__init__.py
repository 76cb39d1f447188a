"""Few-step model training: the algorithms of :mod:`cmjax.training.algorithms` (decoder and image CMs).

    from cmjax.training import train_and_evaluate
    train_and_evaluate(config, workdir)        # config: see configs/default.py

Modules: ``families`` (model parameterisations), ``algorithms`` (one entry per algorithm: loss,
sampler, target network, teacher), ``step`` (the pure train step), ``state`` (TrainState,
shardings), ``optim``, ``input_pipeline``, ``run_checkpoints``, ``reporting``, ``loop``, ``trained``
(loading a finished run for evaluation and editing).
"""
from cmjax.training.loop import NonFiniteLossError, train_and_evaluate, validate_config

__all__ = ["NonFiniteLossError", "train_and_evaluate", "validate_config"]
