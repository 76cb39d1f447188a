"""Measuring models: FID and reconstruction metrics.

    sources.py   image sets named on a command line (folders, TFDS, digits) -> uniform uint8 batches
    fid.py       those images, or a sampler's -> sharded Inception features (cmjax.models.inception)
                 -> statistics (reference ones cached); the FID hook of train.py
    frechet.py   features -> float64 statistics -> the Frechet distance (FIDStats, fid)
    metrics.py   PSNR and SSIM, the only implementations in the package
"""
