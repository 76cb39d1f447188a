"""Consistency-model training: iCT / CT / CD / EDM for the consistency decoder and image CMs.

    from cmjax.training import train_and_evaluate
    train_and_evaluate(config, workdir)        # config: see configs/default.py

Modules: ``families`` (model parameterisations), ``step`` (the pure train step), ``state``
(TrainState, shardings), ``optim``, ``input_pipeline``, ``checkpointing``, ``reporting``, ``loop``.
"""
from cmjax.training.loop import NonFiniteLossError, train_and_evaluate, validate_config

__all__ = ["NonFiniteLossError", "train_and_evaluate", "validate_config"]
