"""A tiny PyTorch copy of OpenAI's consistency-decoder network ("ConvUNetVAE"), with its original
parameter names, to write the formats OpenAI's weights come in (TorchScript ``decoder.pt``, the
extracted ``consistency_decoder.safetensors`` + ``embedding.safetensors``, torch.save pickles).

Names and computation follow OpenAI's TorchScript (as recovered by diffusers'
``scripts/convert_consistency_decoder.py``):
``embed_image.f``, ``embed_time.{emb,f_1,f_2}``, ``blocks.{down_i_conv_j, down_i_downsamp, mid_k,
up_i_conv_j, up_i_upsamp}.{gn_1,f_1,f_t,gn_2,f_2,f_s}``, ``output.{gn,f}``; convs and linears hold
``w``/``b``, GroupNorms ``g``/``b`` (32 groups, which the files do not record). The forward takes
OpenAI's arguments: ``(c_in * x_t, t, features=normalised latents)`` and upsamples the latents x8.

``table`` chooses where the timestep table lives: ``"param"`` (``embed_time.emb.weight``),
``"attribute"`` (a plain tensor attribute: a scripted module saves it as ``embed_time.table``, a
traced one bakes it into the archive's constants).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

GROUPS = 32
# Channel widths must be multiples of 32 (the groups); small enough for CPU tests.
TINY = dict(channels=(32, 32, 64, 64), layers=1, timesteps=1024)


class Conv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(cout))
        self.pad = k // 2

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=self.pad)


class Linear(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(cout, cin) / cin ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(cout))

    def forward(self, x):
        return F.linear(x, self.w, self.b)


class GroupNorm(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.g = nn.Parameter(1 + 0.2 * torch.randn(c))
        self.b = nn.Parameter(0.2 * torch.randn(c))

    def forward(self, x):
        return F.group_norm(x, 32, self.g, self.b, 1e-5)  # GROUPS (TorchScript needs a literal)


class ResBlock(nn.Module):
    """OpenAI's ConvResblock; ``resample`` 0 none, 1 down (avg-pool 2x2), 2 up (nearest x2)."""

    def __init__(self, cin: int, cout: int, temb: int, resample: int = 0):
        super().__init__()
        self.f_t = Linear(temb, 2 * cout)
        self.gn_1 = GroupNorm(cin)
        self.f_1 = Conv(cin, cout)
        self.gn_2 = GroupNorm(cout)
        self.f_2 = Conv(cout, cout)
        self.f_s = Conv(cin, cout, 1) if cin != cout else nn.Identity()
        self.resample = resample

    def _resample(self, x):
        if self.resample == 1:
            return F.avg_pool2d(x, 2)
        if self.resample == 2:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x, t):
        scale, shift = self.f_t(F.silu(t)).chunk(2, dim=1)
        h = self.f_1(self._resample(F.silu(self.gn_1(x))))
        h = self.gn_2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.f_s(self._resample(x)) + self.f_2(F.silu(h))


class TimeEmbed(nn.Module):
    """emb (the table, an nn.Embedding) -> f_1 -> SiLU -> f_2."""

    def __init__(self, timesteps: int, c: int, temb: int):
        super().__init__()
        self.emb = nn.Embedding(timesteps, c, _weight=torch.randn(timesteps, c))
        self.f_1 = Linear(c, temb)
        self.f_2 = Linear(temb, temb)

    def table_weight(self) -> torch.Tensor:
        return self.emb.weight

    def forward(self, t):
        return self.f_2(F.silu(self.f_1(self.emb(t))))


class TimeEmbedPlainTable(nn.Module):
    """The same, with the table a plain tensor attribute (neither parameter nor buffer)."""

    def __init__(self, timesteps: int, c: int, temb: int):
        super().__init__()
        self.table = torch.randn(timesteps, c)
        self.f_1 = Linear(c, temb)
        self.f_2 = Linear(temb, temb)

    def table_weight(self) -> torch.Tensor:
        return self.table

    def forward(self, t):
        return self.f_2(F.silu(self.f_1(self.table[t])))


class ImageEmbed(nn.Module):
    def __init__(self, cin: int, c: int):
        super().__init__()
        self.f = Conv(cin, c)

    def forward(self, x):
        return self.f(x)


class ImageUnembed(nn.Module):
    def __init__(self, c: int, cout: int):
        super().__init__()
        self.gn = GroupNorm(c)
        self.f = Conv(c, cout)

    def forward(self, x):
        return self.f(F.silu(self.gn(x)))


class ConvUNetVAE(nn.Module):
    def __init__(self, channels=TINY["channels"], layers=TINY["layers"], timesteps=TINY["timesteps"],
                 table: str = "param", latent_channels: int = 4):
        super().__init__()
        temb = 4 * channels[0]
        self.embed_image = ImageEmbed(3 + latent_channels, channels[0])
        self.embed_time = (TimeEmbed if table == "param" else TimeEmbedPlainTable)(timesteps, channels[0], temb)
        blocks: dict[str, nn.Module] = {}
        skip_widths = [channels[0]]
        prev = channels[0]
        levels = len(channels)
        for i, c in enumerate(channels):
            for j in range(layers):
                blocks[f"down_{i}_conv_{j}"] = ResBlock(prev, c, temb)
                prev = c
                skip_widths.append(c)
            if i < levels - 1:
                blocks[f"down_{i}_downsamp"] = ResBlock(c, c, temb, resample=1)
                skip_widths.append(c)
        blocks["mid_0"] = ResBlock(prev, prev, temb)
        blocks["mid_1"] = ResBlock(prev, prev, temb)
        for i in reversed(range(levels)):
            c = channels[i]
            for j in range(layers + 1):
                blocks[f"up_{i}_conv_{j}"] = ResBlock(prev + skip_widths.pop(), c, temb)
                prev = c
            if i > 0:
                blocks[f"up_{i}_upsamp"] = ResBlock(c, c, temb, resample=2)
        self.blocks = nn.ModuleDict(blocks)
        self.output = ImageUnembed(channels[0], 6)

    def forward(self, x, t, features):
        x = torch.cat([x, F.interpolate(features, scale_factor=8.0, mode="nearest")], dim=1)
        temb = self.embed_time(t)
        h = self.embed_image(x)
        skips = [h]
        for name, block in self.blocks.items():
            if name.startswith("up_") and not name.endswith("upsamp"):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, temb)
            if name.startswith("down_"):
                skips.append(h)
        return self.output(h)


def make(seed: int = 0, **kw) -> ConvUNetVAE:
    torch.manual_seed(seed)
    return ConvUNetVAE(**kw).eval()


def example_inputs(batch: int = 1, h: int = 2, w: int = 2, latent_channels: int = 4):
    g = torch.Generator().manual_seed(123)
    return (torch.randn(batch, 3, 8 * h, 8 * w, generator=g), torch.tensor([1008] * batch),
            torch.randn(batch, latent_channels, h, w, generator=g))


def save_torchscript(module: ConvUNetVAE, path: Path, mode: str = "script") -> Path:
    """torch.jit.script or torch.jit.trace the module and save it as OpenAI did (decoder.pt)."""
    if mode == "script":
        ts = torch.jit.script(module)
    else:
        import warnings

        with warnings.catch_warnings():  # interpolate's shape checks become constants: expected here
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            ts = torch.jit.trace(module, example_inputs(), check_trace=False)
    torch.jit.save(ts, str(path))
    return path


def openai_state(module: ConvUNetVAE) -> dict[str, np.ndarray]:
    """Every tensor under OpenAI's names (the table as ``embed_time.emb.weight``), numpy fp32."""
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    state["embed_time.emb.weight"] = module.embed_time.table_weight().detach().numpy().copy()
    return state


def save_pair(module: ConvUNetVAE, folder: Path, dtype=np.float32) -> Path:
    """The extracted copy: consistency_decoder.safetensors (no table) + embedding.safetensors."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.astype(dtype) for k, v in openai_state(module).items()}
    table = state.pop("embed_time.emb.weight")
    save_file(state, str(folder / "consistency_decoder.safetensors"))
    save_file({"weight": table}, str(folder / "embedding.safetensors"))
    return folder / "consistency_decoder.safetensors"


def diffusers_peer(module: ConvUNetVAE):
    """A tiny diffusers ConsistencyDecoderVAE whose decoder_unet holds ``module``'s weights, renamed
    with cmjax.weights.openai (strict load_state_dict: every parameter must be covered)."""
    from diffusers import ConsistencyDecoderVAE

    from cmjax.weights.openai import openai_state_to_diffusers

    channels = tuple(int(m.f_1.w.shape[0]) for n, m in module.blocks.items() if n.endswith("_conv_0")
                     and n.startswith("down_"))
    layers = sum(n.startswith("down_0_conv_") for n in module.blocks)
    vae = ConsistencyDecoderVAE(
        decoder_block_out_channels=channels, decoder_layers_per_block=layers, decoder_norm_num_groups=GROUPS,
        decoder_num_train_timesteps=int(openai_state(module)["embed_time.emb.weight"].shape[0]),
        encoder_block_out_channels=(8, 8, 8, 8), encoder_layers_per_block=1, encoder_norm_num_groups=4)
    renamed = openai_state_to_diffusers(openai_state(module), num_levels=len(channels))
    vae.decoder_unet.load_state_dict({k: torch.from_numpy(v) for k, v in renamed.items()}, strict=True)
    return vae.eval()
