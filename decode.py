#!/usr/bin/env python
"""Decode SD latents (or images) into PNGs with the consistency decoder: see cmjax/cli/decode.py.

    python decode.py --checkpoint openai/consistency-decoder --images --output out examples/
"""
import sys

from cmjax.cli import decode

if __name__ == "__main__":
    sys.exit(decode.main())
