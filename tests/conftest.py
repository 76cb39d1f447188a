"""Test-wide settings.

Convolutions use XLA's own lowering unless a test asks for another: a plan cached on the
developer's machine (``cmjax.tuning``, read by every decode) would make tests depend on it. The
tests of the plan itself (tests/test_tuning.py, test_decoder.py's default-settings tests) unset it.
Subprocesses started by tests inherit the setting (the decode.py tests set im2col for theirs:
see tests/test_decode_cli.py's ``env``).
"""
import os

os.environ["CMJAX_CONV_LOWERING"] = "xla"
