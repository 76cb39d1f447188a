"""Test-wide settings.

Convolutions use XLA's own lowering unless a test asks for another: the measured choice
(``cmjax.models.conv_lowering``) would time kernels during tests and depend on the machine.
Subprocesses started by tests inherit the setting (the decode.py tests set im2col for theirs:
see tests/test_decode_cli.py's ``env``).
"""
import os

os.environ["CMJAX_CONV_LOWERING"] = "xla"
