"""Measuring models: FID and reconstruction metrics.

    fid.py       images (folders, TFDS, digits, samplers) -> sharded Inception features (cmjax.models.inception)
                 -> float64 statistics (cached) -> Frechet distance; the FID hook of train.py
    metrics.py   PSNR and SSIM, the only implementations in the package
"""
