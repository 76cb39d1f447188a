"""Published checkpoints by name: verified download, conversion on first use, a local cache.

    resolve_checkpoint("openai")                       OpenAI's decoder.pt (TorchScript, fp32, 2.49 GB)
    resolve_checkpoint("openai/consistency-decoder")   the Hugging Face Hub repo (diffusers, fp16)
    resolve_checkpoint("ckpt/")                        a cmjax checkpoint: returned as it is
    resolve_checkpoint("decoder.pt")                   a local PyTorch checkpoint: converted once

each return the path of a cmjax checkpoint directory, converting into the cache the first time.

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
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

OPENAI_DECODER_URL = ("https://openaipublic.azureedge.net/diff-vae/"
                      "c9cebd3132dd9c42936d803e33424145a748843c8f716c0814838bdc8a2fe7cb/decoder.pt")
HUB_REPO = "openai/consistency-decoder"
OPENAI = "openai"
NAMES = (OPENAI, HUB_REPO)
CACHE_ENV = "CMJAX_CACHE"
URL_ENV = "CMJAX_OPENAI_URL"
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")

Report = Callable[[str], None]


class DownloadError(OSError):
    """A download failed or did not verify; the message names the URL or file."""


def cache_dir() -> Path:
    """The cache root: $CMJAX_CACHE, else ~/.cache/cmjax."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cmjax").expanduser()


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download_verified(url: str, dest: Path, sha256: str, *, progress: bool = True, timeout: float = 60,
                      report: Report | None = None) -> Path:
    """Fetch ``url`` to ``dest`` unless a file with that SHA-256 is already there; returns ``dest``.

    Streams into ``dest``'s folder under a temporary name, hashing as it goes, with a tqdm bar;
    the file is renamed onto ``dest`` only if its SHA-256 is ``sha256``. A mismatch deletes it and
    raises DownloadError, as does a cached file that no longer verifies (it is fetched again).
    """
    from tqdm.auto import tqdm

    say = report or (lambda _m: None)
    dest = Path(dest)
    if dest.exists() and not dest.is_file():
        raise DownloadError(f"{dest} exists and is not a regular file")
    if dest.is_file():
        if sha256_file(dest) == sha256:
            say(f"using the verified cached {dest}")
            return dest
        say(f"{dest} does not match SHA-256 {sha256}: fetching it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    say(f"downloading {url}")
    try:
        h = hashlib.sha256()
        size = 0
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress, file=sys.stderr) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        if total is not None and size != total:
            raise DownloadError(f"{url}: connection closed after {size} of {total} bytes")
        if h.hexdigest() != sha256:
            raise DownloadError(f"{url}: SHA-256 mismatch: expected {sha256}, got {h.hexdigest()} "
                                f"({size} bytes); the download was deleted")
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        raise DownloadError(f"{url}: download failed ({getattr(e, 'reason', e)})") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


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
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as e:
        raise DownloadError(f"fetching {repo} needs huggingface_hub (pip install huggingface_hub): {e}") from e
    from cmjax.convert.diffusers import WEIGHT_FILES

    endpoint = os.environ.get("HF_ENDPOINT") or None
    say = report or (lambda _m: None)
    say(f"fetching {repo} from {endpoint or 'the Hugging Face Hub'}")
    kw = dict(revision=revision, endpoint=endpoint)
    if not progress:
        kw["tqdm_class"] = _SilentTqdm.get()
    try:
        config = Path(hf_hub_download(repo, "config.json", **kw))
        for name in WEIGHT_FILES:
            try:
                weights = Path(hf_hub_download(repo, name, **kw))
                break
            except EntryNotFoundError:
                continue
        else:
            raise DownloadError(f"{repo}: the repo has none of {', '.join(WEIGHT_FILES)}")
    except DownloadError:
        raise
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, missing repo ...)
        raise DownloadError(f"{repo}: download from {endpoint or 'the Hub'} failed: {type(e).__name__}: {e}") from e
    if weights.parent != config.parent:
        raise DownloadError(f"{repo}: config.json and {weights.name} came from different revisions")
    return config.parent


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


def _convert_into_cache(src: Path, name: str, *, report: Report | None) -> Path:
    """Convert ``src`` to checkpoints/<name> in the cache, unless a converted copy is there."""
    from cmjax.checkpoint import CONFIG_FILE
    from cmjax.convert import convert

    dst = cache_dir() / "checkpoints" / name
    if (dst / CONFIG_FILE).is_file():
        return dst
    if report:
        report(f"converting {src} into {dst} (first use)")
    try:
        convert(src, dst, kind="decoder", report=report)
    except FileExistsError:
        if not (dst / CONFIG_FILE).is_file():  # a half-made directory that is not ours: refuse to guess
            raise
    return dst


def resolve_checkpoint(name_or_path: str | os.PathLike, *, progress: bool = True,
                       report: Report | None = None) -> Path:
    """The cmjax decoder checkpoint directory for a name or a path, fetched and converted if needed.

    * an existing cmjax checkpoint directory (or any other directory holding no recognisable
      PyTorch checkpoint): returned unchanged, for ``load_decoder`` to read or reject;
    * a PyTorch checkpoint file or folder (``decoder.pt``, a diffusers folder, ...): converted
      once into the cache (keyed by its path, size and modification time);
    * ``"openai"``: OpenAI's decoder.pt, downloaded, SHA-256 verified, converted once;
    * ``"openai/consistency-decoder"``: the Hub repo (diffusers, fp16 upcast to fp32), converted once.

    Raises FileNotFoundError for a path that does not exist and is no known name;
    DownloadError / ConversionError on a failed download or conversion.
    """
    from cmjax.checkpoint import CONFIG_FILE
    from cmjax.convert.openai import PAIR_WEIGHTS

    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() and ((path / CONFIG_FILE).is_file() or not any(
                (path / n).exists() for n in ("config.json", PAIR_WEIGHTS, "decoder.pt"))):
            return path
        stat = path.stat()
        key = hashlib.sha256(f"{path.absolute()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return _convert_into_cache(path, f"local-{_slug(path.name)}-{key}", report=report)
    if text == OPENAI:
        url = openai_url()
        pt = fetch_openai_decoder(progress=progress, report=report)
        return _convert_into_cache(pt, f"openai-{expected_sha256(url)[:16]}", report=report)
    if text == HUB_REPO:
        dst = cache_dir() / "checkpoints" / f"hf-{_slug(HUB_REPO)}"
        if (dst / CONFIG_FILE).is_file():  # converted before: no need to ask the Hub
            return dst
        folder = fetch_hub_decoder(HUB_REPO, progress=progress, report=report)
        return _convert_into_cache(folder, dst.name, report=report)
    raise FileNotFoundError(f"{text}: no such checkpoint directory or file, and not a known checkpoint name "
                            f"({', '.join(repr(n) for n in NAMES)})")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-") or "checkpoint"


__all__ = ["DownloadError", "HUB_REPO", "NAMES", "OPENAI", "OPENAI_DECODER_URL", "cache_dir", "download_verified",
           "expected_sha256", "fetch_hub_decoder", "fetch_openai_decoder", "resolve_checkpoint"]
