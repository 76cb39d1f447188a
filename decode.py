"""Decode SD latents (or images, via the SD VAE) into PNGs with the consistency decoder.

    python decode.py --checkpoint openai --output out latents/            # .npy/.npz/.safetensors
    python decode.py --checkpoint openai --images --output out examples/    # photos, via the SD encoder
    python decode.py --checkpoint openai --images --compare --vae sd-vae/ --output out examples/

Runs on every local device (and every host of a multi-host run); see cmjax/decoding/batch/.
"""
import sys

from cmjax.decoding.batch import run

if __name__ == "__main__":
    sys.exit(run.main(description=__doc__))
