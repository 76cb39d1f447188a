"""Test-wide settings.

Convolutions use the im2col lowering unless a test asks for another: the measured choice
(``cmjax.models.conv_lowering``) would time kernels during tests and depend on the machine, and XLA's
own CPU convolution is not bit-identical across simulated device counts at the tiny shapes the tests
use (the decode tests compare 1 and 4 devices bit for bit), while the im2col matmul is.
Subprocesses started by tests inherit the setting.
"""
import os

os.environ["CMJAX_CONV_LOWERING"] = "im2col"
