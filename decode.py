"""Decode SD latents (or images, via the SD VAE) into PNGs with the consistency decoder.

    python decode.py --checkpoint openai --output out latents/            # .npy/.npz/.safetensors
    python decode.py --checkpoint openai --images --output out examples/    # photos, via the SD encoder

``python decode.py --help`` lists the options; the code is cmjax/decoding/batch/ (run.py: flags and main).
"""
import sys

from cmjax.decoding.batch import run

if __name__ == "__main__":
    sys.exit(run.main())
