"""Published checkpoints by name: verified download, conversion on first use, a local cache.

    resolve_checkpoint("openai")                       OpenAI's decoder.pt (TorchScript, fp32, 2.49 GB)
    resolve_checkpoint("openai/consistency-decoder")   the Hugging Face Hub repo (diffusers, fp16)
    resolve_checkpoint("ckpt/")                        a cmjax checkpoint: returned as it is
    resolve_checkpoint("decoder.pt")                   a local PyTorch checkpoint: converted once

each return the path of a cmjax checkpoint directory, converting into the cache the first time
(``kind="vae"`` does the same for SD VAEs: a diffusers AutoencoderKL folder, an LDM file, or the Hub
repo's bundled encoder). ``load_decoder`` / ``load_vae`` (``cmjax.load_decoder`` / ``cmjax.load_vae``)
resolve and then read, process 0 first on several hosts: every command names checkpoints this way.

OpenAI publishes ``decoder.pt`` at a URL whose second-to-last path segment is the file's SHA-256;
the download is streamed to a temporary file, hashed on the way, and kept only if the hash matches
(a mismatch deletes it and raises). A cached file is reused after re-hashing it.

Environment:
    CMJAX_CACHE        cache root (default ~/.cache/cmjax):
                         downloads/<sha256>/decoder.pt      verified OpenAI downloads
                         checkpoints/<name>/                converted cmjax checkpoints
    CMJAX_OPENAI_URL   where to fetch decoder.pt (a mirror, or a test server); its second-to-last
                       path segment must still be the SHA-256 the file is checked against
    HF_ENDPOINT        the Hub endpoint huggingface_hub talks to (its own cache, HF_HUB_CACHE, is
                       used for the Hub files, so a copy fetched by diffusers is reused)
    HF_HUB_OFFLINE     1: use only what is cached; a name that needs a download fails at once

Without network access every name fails fast with one message that says what to do instead
(``OFFLINE_HELP``): the server is probed once, before huggingface_hub's own requests, which retry
for ~30 s and log every retry. decoder.pt is fetched by :func:`cmjax.weights.download.download_verified`
(bounded in time: a minimum rate and an overall deadline; every failure names the URL and file).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import jax

from cmjax import parallel
from cmjax.cache import cache_dir, slug
from cmjax.models.decoder_config import Decoder
from cmjax.models.vae import VAE
from cmjax.weights import checkpoint
from cmjax.weights.checkpoint import CONFIG_FILE, check_destination
from cmjax.weights.diffusers import WEIGHT_FILES
from cmjax.weights.download import OFFLINE_HELP, DownloadError, download_verified, offline, offline_error, probe
from cmjax.weights.from_pytorch import KINDS, convert, is_pytorch_folder

OPENAI_DECODER_URL = ("https://openaipublic.azureedge.net/diff-vae/"
                      "c9cebd3132dd9c42936d803e33424145a748843c8f716c0814838bdc8a2fe7cb/decoder.pt")
HUB_REPO = "openai/consistency-decoder"
OPENAI = "openai"
NAMES = (OPENAI, HUB_REPO)
URL_ENV = "CMJAX_OPENAI_URL"
_SHA256 = re.compile(r"[0-9a-f]{64}")

Report = Callable[[str], None]


def openai_url() -> str:
    """Where decoder.pt is fetched from: $CMJAX_OPENAI_URL, else OpenAI's own URL."""
    return os.environ.get(URL_ENV) or OPENAI_DECODER_URL


def expected_sha256(url: str) -> str:
    """The SHA-256 that OpenAI's URL scheme carries as its second-to-last path segment."""
    parts = urllib.parse.urlparse(url).path.rstrip("/").split("/")
    if len(parts) < 2 or not _SHA256.fullmatch(parts[-2].lower()):
        raise DownloadError(f"{url}: cannot verify this download: the URL's second-to-last path segment must be "
                            "the file's SHA-256 (64 hex digits), as in OpenAI's URL")
    return parts[-2].lower()


def fetch_openai_decoder(*, progress: bool = True, report: Report | None = None) -> Path:
    """OpenAI's decoder.pt in the cache (downloaded and verified if needed); returns its path."""
    url = openai_url()
    sha = expected_sha256(url)
    name = Path(urllib.parse.urlparse(url).path).name or "decoder.pt"
    return download_verified(url, cache_dir() / "downloads" / sha / name, sha, progress=progress, report=report)


def fetch_hub_decoder(repo: str = HUB_REPO, *, revision: str | None = None, progress: bool = True,
                      report: Report | None = None) -> Path:
    """The Hub repo's config.json and weights in huggingface_hub's cache; returns their folder.

    Fetches ``diffusion_pytorch_model.safetensors``, or the ``.fp16`` variant where the repo has
    only that. ``HF_ENDPOINT`` is read at call time, so it can point at a mirror or a test server.
    Files already in huggingface_hub's cache are used without asking the Hub; otherwise the
    endpoint is probed once and, if unreachable (or HF_HUB_OFFLINE is set), DownloadError says
    what to do instead, at once.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as e:
        raise DownloadError(f"fetching {repo} needs huggingface_hub (pip install huggingface_hub): {e}") from e
    endpoint = os.environ.get("HF_ENDPOINT") or None
    say = report or (lambda _m: None)
    say(f"fetching {repo} from {endpoint or 'the Hugging Face Hub'}")
    kw = dict(revision=revision, endpoint=endpoint)
    if not progress:
        kw["tqdm_class"] = _SilentTqdm.get()

    def download(local_files_only: bool) -> tuple[Path, Path]:
        config = Path(hf_hub_download(repo, "config.json", local_files_only=local_files_only, **kw))
        for name in WEIGHT_FILES:
            try:
                return config, Path(hf_hub_download(repo, name, local_files_only=local_files_only, **kw))
            except EntryNotFoundError:
                continue
        raise DownloadError(f"{repo}: the repo has none of {', '.join(WEIGHT_FILES)}")

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # each retry is logged, twice once a root handler exists
    try:
        try:
            config, weights = download(local_files_only=True)
        except DownloadError:
            raise
        except Exception:  # not (completely) cached
            if offline():
                raise offline_error(repo, "not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
            base = (endpoint or "https://huggingface.co").rstrip("/")
            probe(f"{base}/{repo}/resolve/{revision or 'main'}/config.json", repo)
            config, weights = download(local_files_only=False)
    except DownloadError:
        raise
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, missing repo ...)
        raise DownloadError(f"{repo}: download from {endpoint or 'the Hub'} failed: {type(e).__name__}: {e}") from e
    finally:
        hub_logger.setLevel(level)
    if weights.parent != config.parent:
        raise DownloadError(f"{repo}: config.json and {weights.name} came from different revisions")
    return config.parent


def fetch_named(name: str, *, progress: bool = True, report: Report | None = None) -> Path:
    """The PyTorch files a published name (``NAMES``) stands for, downloaded, verified and cached
    on first use: ``OPENAI`` -> OpenAI's decoder.pt, ``HUB_REPO`` -> the Hub folder."""
    if name == OPENAI:
        return fetch_openai_decoder(progress=progress, report=report)
    if name == HUB_REPO:
        return fetch_hub_decoder(HUB_REPO, progress=progress, report=report)
    raise ValueError(f"{name!r} is not a published checkpoint name ({', '.join(NAMES)})")


class _SilentTqdm:
    """A tqdm class with the bar disabled, for huggingface_hub's ``tqdm_class`` (built lazily)."""

    _cls = None

    @classmethod
    def get(cls):
        if cls._cls is None:
            from tqdm.auto import tqdm

            class Silent(tqdm):
                def __init__(self, *args, **kwargs):
                    kwargs["disable"] = True
                    super().__init__(*args, **kwargs)

            cls._cls = Silent
        return cls._cls


def _convert_into_cache(src: Path, name: str, kind: str, *, report: Report | None) -> tuple[Path, Any]:
    """Convert ``src`` to checkpoints/<name> in the cache, unless a converted copy is there.
    Returns (its path, the Decoder/VAE converted now, or None when it was there)."""
    dst = cache_dir() / "checkpoints" / name
    if (dst / CONFIG_FILE).is_file():
        return dst, None
    if report:
        report(f"converting {src} into {dst} (first use)")
    try:
        return dst, convert(src, dst, kind=kind, report=report)
    except FileExistsError:
        if not (dst / CONFIG_FILE).is_file():  # a half-made directory that is not ours: refuse to guess
            raise
    return dst, None


def resolve_checkpoint(name_or_path: str | os.PathLike, *, kind: str = "decoder", progress: bool = True,
                       report: Report | None = None) -> Path:
    """The cmjax checkpoint directory (a ``kind`` = "decoder" or "vae") for a name or a path, fetched
    and converted if needed: the one way every command names a checkpoint (--checkpoint, --vae, ...).

    * an existing cmjax checkpoint directory (or any other directory holding no recognisable
      PyTorch checkpoint): returned unchanged, for ``checkpoint.read_*`` to read or reject;
    * a PyTorch checkpoint file or folder (``decoder.pt``, a diffusers folder, an LDM VAE, ...):
      converted once into the cache (keyed by kind, path, size and modification time);
    * ``"openai"``: OpenAI's decoder.pt, downloaded, SHA-256 verified, converted once (decoder only);
    * ``"openai/consistency-decoder"``: the Hub repo (diffusers, fp16 upcast to fp32), converted
      once: its UNet as the decoder, or its bundled SD encoder as an encoder-only VAE.

    Raises FileNotFoundError for a path that does not exist and is no known name;
    DownloadError / ConversionError on a failed download or conversion.
    """
    return _resolve(name_or_path, kind, progress, report)[0]


def _resolve(name_or_path: str | os.PathLike, kind: str, progress: bool, report: Report | None) -> tuple[Path, Any]:
    """resolve_checkpoint's (path, and the model converted now if it was: None otherwise)."""
    convert_into_cache = functools.partial(_convert_into_cache, report=report)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    suffix = "" if kind == "decoder" else f"-{kind}"
    if path.exists():
        if path.is_dir() and ((path / CONFIG_FILE).is_file() or not is_pytorch_folder(path)):
            return path, None
        stat = path.stat()
        key = hashlib.sha256(f"{path.absolute()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        name = slug(path.name, sep="--", fallback="checkpoint")
        return convert_into_cache(path, f"local-{name}-{key}{suffix}", kind)
    if text == OPENAI and kind == "decoder":
        pt = fetch_named(OPENAI, progress=progress, report=report)
        return convert_into_cache(pt, f"openai-{expected_sha256(openai_url())[:16]}", kind)
    if text == HUB_REPO:
        dst = cache_dir() / "checkpoints" / f"hf-{slug(HUB_REPO, sep='--')}{suffix}"
        if (dst / CONFIG_FILE).is_file():  # converted before: no need to ask the Hub
            return dst, None
        folder = fetch_named(HUB_REPO, progress=progress, report=report)
        return convert_into_cache(folder, dst.name, kind)
    names = NAMES if kind == "decoder" else (HUB_REPO,)
    raise FileNotFoundError(f"{text}: no such checkpoint directory or file, and not a known {kind} checkpoint name "
                            f"({', '.join(repr(n) for n in names)})")


def convert_checkpoint(name_or_path: str | os.PathLike, dst: str | os.PathLike, *, kind: str | None = None,
                       keep_dtype: bool = False, overwrite: bool = False, progress: bool = True,
                       report: Report | None = None):
    """``python -m cmjax.convert``: convert a PyTorch checkpoint file or folder, or the one a
    published name stands for (fetched first, as :func:`resolve_checkpoint` fetches it), into the
    cmjax checkpoint directory ``dst``. Returns the Decoder or VAE written; see
    :func:`cmjax.weights.from_pytorch.convert` for the other arguments."""
    text = os.fspath(name_or_path)
    src = name_or_path
    if not Path(text).exists() and text in NAMES:
        check_destination(dst, overwrite=overwrite)  # before a multi-GB download
        src = fetch_named(text, progress=progress, report=report)
    return convert(src, dst, kind=kind, keep_dtype=keep_dtype, overwrite=overwrite, report=report)


def _resolve_on_every_host(name_or_path, kind: str, progress: bool, report: Report | None) -> tuple[Path, Any]:
    """(path, the model converted now or None); process 0 first. A model converted now is used as it is
    (not read back from what was just written) only in a single-process run."""
    path, model = parallel.lead_first(lambda lead: _resolve(
        name_or_path, kind, progress and lead, report if lead else None))
    return path, model if jax.process_count() == 1 else None


def load_decoder(name_or_path: str | os.PathLike, *, sharding=None, verify: bool = True, progress: bool = True,
                 report: Report | None = None) -> Decoder:
    """``cmjax.load_decoder``: a Decoder from any name or path :func:`resolve_checkpoint` takes
    (downloaded and converted on first use; on several hosts, process 0 first)."""
    return start_loading_decoder(name_or_path, sharding=sharding, verify=verify, progress=progress,
                                 report=report).decoder()


def start_loading_decoder(name_or_path: str | os.PathLike, *, sharding=None, verify: bool = True,
                          progress: bool = True, report: Report | None = None) -> checkpoint.Loading:
    """load_decoder, with the params read in the background (``checkpoint.Loading``): the config and
    the params' shapes at once, the Decoder from ``.decoder()``, the digest check from ``.check()``.
    A checkpoint converted now, in this process, is used from memory (no digest to check)."""
    path, model = _resolve_on_every_host(name_or_path, "decoder", progress, report)
    if model is not None:
        return checkpoint.Loading.converted(model, sharding=sharding)
    return checkpoint.Loading.start(path, sharding=sharding, verify=verify)


def load_vae(name_or_path: str | os.PathLike, *, sharding=None, verify: bool = True, progress: bool = True,
             report: Report | None = None) -> VAE:
    """``cmjax.load_vae``: an SD VAE (SD 1.x/2.x, SDXL, SD3, FLUX) from any name or path
    :func:`resolve_checkpoint` takes: a cmjax VAE checkpoint, a diffusers AutoencoderKL or
    ConsistencyDecoderVAE folder, an LDM/single-file checkpoint, or "openai/consistency-decoder"
    (its bundled SD encoder only)."""
    path, model = _resolve_on_every_host(name_or_path, "vae", progress, report)
    if model is not None:
        return VAE(model.config, jax.device_put(model.params, sharding))
    return checkpoint.read_vae(path, sharding=sharding, verify=verify)


__all__ = ["DownloadError", "HUB_REPO", "NAMES", "OFFLINE_HELP", "OPENAI", "OPENAI_DECODER_URL", "cache_dir",
           "convert_checkpoint", "download_verified", "expected_sha256", "fetch_hub_decoder", "fetch_named",
           "fetch_openai_decoder", "load_decoder", "load_vae", "offline", "resolve_checkpoint", "start_loading_decoder"]
