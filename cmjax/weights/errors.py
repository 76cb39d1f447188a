"""The error every weights reader raises for a file or directory it cannot read.

One class for the TorchScript/pickle reader, safetensors and cmjax checkpoint directories, so a
caller catches one thing; the message always names the path and the problem.
"""


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read; the message names the path and the problem."""
