"""Verified downloads: one file from a URL into a cache, bounded in time, kept only if its SHA-256 matches.

    download_verified(url, dest, sha256)  streams into an exclusive temporary sibling of ``dest``,
        hashing as it goes, with a progress bar; renamed onto ``dest`` only when the hash matches.
        Bounded: ``timeout`` per read, at least ``MIN_RATE`` bytes/s over every ``RATE_WINDOW``
        seconds, the whole download within ``DOWNLOAD_DEADLINE`` (a watchdog shuts the connection
        down); every failure (a full disk included) names the URL and the file.
    offline() / probe(url)  HF_HUB_OFFLINE, and one HEAD request that turns "no network" into
        one message (``OFFLINE_HELP``) instead of minutes of retries.

A download killed mid-way leaves ``.NAME.part-HOST-PID-XXXX``; the next download of that file
removes such parts once their process is gone. Names and URLs of the published checkpoints are
:mod:`cmjax.weights.hub`'s.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from cmjax.files import create_temp, temp_pid

_CHUNK = 1 << 20
_PROBE_TIMEOUT = 10.0
_STALE_PART_AGE = 300.0  # seconds without a write before a dead process's part file is removed
_PART = ".part-"
# A download must finish within DOWNLOAD_DEADLINE seconds and never run below MIN_RATE bytes/s over
# RATE_WINDOW seconds (OpenAI's 2.49 GB decoder.pt: ~35 min at 1.2 MB/s, the deadline's own floor).
DOWNLOAD_DEADLINE = 6 * 3600.0
MIN_RATE = 16 * 1024.0
RATE_WINDOW = 120.0
OFFLINE_HELP = ("Without network access: download OpenAI's decoder.pt or the Hub folder "
                "openai/consistency-decoder (config.json + diffusion_pytorch_model.fp16.safetensors) "
                "on another machine and pass its path instead of the name (it is converted "
                "automatically), or convert it first with `python -m cmjax.convert SRC DST`; set "
                "HF_ENDPOINT to use a Hub mirror (CMJAX_OPENAI_URL for decoder.pt); decode.py --images "
                "also needs an SD VAE then: --vae PATH.")

Report = Callable[[str], None]


class DownloadError(OSError):
    """A download failed or did not verify; the message names the URL or file."""


def offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network access."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def offline_error(what: str, why: str) -> DownloadError:
    return DownloadError(f"{what}: {why}. {OFFLINE_HELP}")


def probe(url: str, what: str) -> None:
    """One HEAD request to ``url``; DownloadError (with OFFLINE_HELP) if the server cannot be
    reached at all. Any HTTP answer, even an error status, counts as reachable."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT).close()
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        host = urllib.parse.urlparse(url).netloc or url
        raise offline_error(what, f"cannot reach {host} ({getattr(e, 'reason', e)})") from None


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p ``path``; returns the folders it created, deepest first."""
    created, p = [], path
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return created


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; stops at the first one that holds something
        try:
            folder.rmdir()
        except OSError:
            return


def _remove_stale_parts(dest: Path) -> None:
    """Delete ``.NAME.part-HOST-PID-XXXX`` files left by killed downloads of this host: their
    process no longer exists here and they have not been written to for a while (so a download
    running on another host that shares the cache is left alone)."""
    for part in dest.parent.glob(f".{dest.name[:40]}{_PART}*"):
        pid = temp_pid(part.name, _PART)
        if pid is None or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except OSError:  # exists but not ours (EPERM)
            continue
        try:
            st = os.lstat(part)
            if stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime > _STALE_PART_AGE:
                part.unlink()
        except FileNotFoundError:
            pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _Watchdog:
    """Shuts the download's connections down when its deadline passes: a server that sends a byte
    every few seconds (headers or body) never trips the per-read timeout, and only this bounds it."""

    def __init__(self, seconds: float):
        self.fired = False
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()

    def _fire(self) -> None:
        self.fired = True
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # a blocked read returns at once
            except OSError:
                pass

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener whose HTTP(S) connections this watchdog can shut down."""
        watchdog = self

        def watched(cls):
            class Watched(cls):
                def connect(self):
                    super().connect()
                    watchdog._sockets.append(self.sock)
                    if watchdog.fired:
                        watchdog._fire()
            return Watched

        class HTTP(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(watched(http.client.HTTPConnection), req)

        class HTTPS(urllib.request.HTTPSHandler):
            def https_open(self, req):
                extra = {"check_hostname": self._check_hostname} if getattr(self, "_check_hostname", None) else {}
                return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context, **extra)

        return urllib.request.build_opener(HTTP, HTTPS)


def _stream(response, out, h, bar, min_rate: float, rate_window: float) -> int:
    """Copy the body of ``response`` into ``out`` (hashing into ``h``); DownloadError when fewer than
    ``min_rate`` bytes/s arrive over a ``rate_window``-second stretch. Returns the byte count."""
    size, window_start, window_bytes = 0, time.monotonic(), 0
    while chunk := response.read1(_CHUNK):  # read1 returns what arrived: the rate is checked as it comes
        out.write(chunk)
        h.update(chunk)
        size += len(chunk)
        window_bytes += len(chunk)
        bar.update(len(chunk))
        now = time.monotonic()
        if now - window_start >= rate_window:
            if window_bytes < min_rate * (now - window_start):
                raise DownloadError(f"download too slow: {window_bytes} bytes in {now - window_start:.0f} s "
                                    f"(under {min_rate:.0f} bytes/s) after {size} bytes")
            window_start, window_bytes = now, 0
    return size


def _fetch(url: str, out, h, *, name: str, progress: bool, timeout: float, deadline: float, min_rate: float,
           rate_window: float) -> tuple[int, int | None]:
    """Download ``url`` into the open file ``out`` within the time bounds; (bytes, Content-Length or None)."""
    from tqdm.auto import tqdm

    with _Watchdog(deadline) as watchdog:
        try:
            with watchdog.opener().open(url, timeout=timeout) as response:
                total = response.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                          disable=not progress, file=sys.stderr) as bar:
                    size = _stream(response, out, h, bar, min_rate, rate_window)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError):
            if not watchdog.fired:
                raise
        if watchdog.fired:
            raise DownloadError(f"download did not finish within {deadline:.0f} s")
    return size, total


def download_verified(url: str, dest: Path, sha256: str, *, progress: bool = True, timeout: float = 60,
                      deadline: float = DOWNLOAD_DEADLINE, min_rate: float = MIN_RATE,
                      rate_window: float = RATE_WINDOW, report: Report | None = None) -> Path:
    """Fetch ``url`` to ``dest`` unless a file with that SHA-256 is already there; returns ``dest``.

    Streams into ``dest``'s folder under an exclusive temporary name, hashing as it goes, with a
    tqdm bar; the file is renamed onto ``dest`` only if its SHA-256 is ``sha256``. A mismatch
    deletes it and raises DownloadError, as does a cached file that no longer verifies (it is
    fetched again). Bounded in time: ``timeout`` seconds per read, fewer than ``min_rate`` bytes/s
    over any ``rate_window`` seconds fails, and the whole download must finish within
    ``deadline`` seconds. Every failure (a full disk included) names the URL and ``dest``.
    """
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
    if offline():
        raise offline_error(url, f"not in the cache ({dest}) and HF_HUB_OFFLINE is set")
    created, tmp, ok = [], None, False
    say(f"downloading {url}")
    try:
        created = _make_dirs(dest.parent)
        _remove_stale_parts(dest)
        fd, tmp = create_temp(dest, _PART)
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            size, total = _fetch(url, out, h, name=dest.name, progress=progress, timeout=timeout, deadline=deadline,
                                 min_rate=min_rate, rate_window=rate_window)
        if total is not None and size != total:
            raise DownloadError(f"connection closed after {size} of {total} bytes")
        if h.hexdigest() != sha256:
            raise DownloadError(f"SHA-256 mismatch: expected {sha256}, got {h.hexdigest()} ({size} bytes)")
        os.replace(tmp, dest)
        ok = True
    except DownloadError as e:
        raise DownloadError(f"{url}: {e}; the download was deleted ({dest} not written)") from None
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: download failed ({e.reason})") from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        raise offline_error(url, f"download failed ({getattr(e, 'reason', e)})") from None
    except OSError as e:  # the cache: a full disk, no permission, a read-only file system
        raise DownloadError(f"{url}: cannot write the download to {dest}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if not ok:
            _remove_if_empty(created)
    return dest
