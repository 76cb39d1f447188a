"""Named checkpoints: verified downloads from a loopback HTTP server, conversion on first use, the cache.

The server (http.server on 127.0.0.1, in a thread) plays both OpenAI's file host and enough of
the Hugging Face Hub for huggingface_hub.hf_hub_download (HEAD/GET on /<repo>/resolve/<rev>/<file>
with X-Repo-Commit and ETag headers).
"""
from __future__ import annotations

import hashlib
import http.server
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cmjax  # noqa: E402
from cmjax.cli.convert import main as convert_main  # noqa: E402
from cmjax.weights.from_pytorch import convert  # noqa: E402
from cmjax.weights.hub import DownloadError, resolve_checkpoint, start_loading_decoder  # noqa: E402
from tests import openai_peer  # noqa: E402
from tests.torch_peers import save_vae, tiny_consistency_vae  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB = "/openai/consistency-decoder/resolve/main/"


class Server:
    """Serves ``routes`` (path -> bytes); records the (method, path) of every file request."""

    def __init__(self):
        self.routes: dict[str, bytes] = {}
        self.drip: dict[str, tuple[bytes, bytes, float]] = {}  # path -> raw response: at once, trickled, interval
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _headers(self):
                body = server.routes.get(self.path)
                if self.path in server.routes or self.path.startswith(HUB):
                    server.requests.append((self.command, self.path))
                self.send_response(200 if body is not None else 404)
                self.send_header("X-Repo-Commit", COMMIT)
                if body is None:
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                else:
                    self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                return body

            def do_HEAD(self):  # noqa: N802
                self._headers()

            def do_GET(self):  # noqa: N802
                if self.path in server.drip:  # `at_once`, then `text` one byte every `interval` seconds
                    at_once, text, interval = server.drip[self.path]
                    try:
                        self.wfile.write(at_once)
                        for i in range(len(text)):
                            self.wfile.write(text[i:i + 1])
                            self.wfile.flush()
                            time.sleep(interval)
                    except OSError:  # the client gave up
                        pass
                    self.close_connection = True
                    return
                body = self._headers()
                if body is not None:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def gets(self, path_part: str) -> int:
        return sum(m == "GET" and path_part in p for m, p in self.requests)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(scope="module")
def decoder_pt(tmp_path_factory, server):
    """A tiny OpenAI-format TorchScript decoder.pt served at /<sha256>/decoder.pt (and a corrupted
    copy served at a URL naming the same hash)."""
    path = openai_peer.save_torchscript(openai_peer.make(seed=3), tmp_path_factory.mktemp("pt") / "decoder.pt")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    server.routes[f"/diff-vae/{sha}/decoder.pt"] = data
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    server.routes[f"/corrupt/{sha}/decoder.pt"] = bytes(bad)
    return path, sha


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CMJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def assert_same_params(a, b):
    assert a.config == b.config
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_openai_download_is_verified_converted_and_cached(server, decoder_pt, cache, monkeypatch, tmp_path):
    path, sha = decoder_pt
    monkeypatch.setenv("CMJAX_OPENAI_URL", f"{server.url}/diff-vae/{sha}/decoder.pt")
    before = server.gets(sha)
    ckpt = resolve_checkpoint("openai", progress=False)
    assert ckpt == cache / "checkpoints" / f"openai-{sha[:16]}"
    assert server.gets(sha) == before + 1
    assert sorted(p.name for p in (cache / "downloads" / sha).iterdir()) == ["decoder.pt"]  # no partial files
    direct = convert(path, tmp_path / "direct")
    assert_same_params(cmjax.load_decoder(ckpt), direct)
    # converted before: nothing is fetched or converted again
    stamp = (ckpt / "cmjax.json").stat().st_mtime_ns
    assert resolve_checkpoint("openai", progress=False) == ckpt
    assert server.gets(sha) == before + 1 and (ckpt / "cmjax.json").stat().st_mtime_ns == stamp
    # the conversion gone: the verified download is reused, not fetched again
    import shutil

    shutil.rmtree(ckpt)
    lines: list[str] = []
    assert resolve_checkpoint("openai", progress=False, report=lines.append) == ckpt
    assert server.gets(sha) == before + 1 and any("using the verified cached" in m for m in lines)
    # a cached file that no longer verifies is fetched again
    shutil.rmtree(ckpt)
    (cache / "downloads" / sha / "decoder.pt").write_bytes(b"tampered")
    resolve_checkpoint("openai", progress=False)
    assert server.gets(sha) == before + 2
    assert hashlib.sha256((cache / "downloads" / sha / "decoder.pt").read_bytes()).hexdigest() == sha


def test_corrupt_download_is_refused_and_deleted(server, decoder_pt, cache, monkeypatch):
    _, sha = decoder_pt
    url = f"{server.url}/corrupt/{sha}/decoder.pt"
    monkeypatch.setenv("CMJAX_OPENAI_URL", url)
    with pytest.raises(DownloadError) as e:
        resolve_checkpoint("openai", progress=False)
    assert "SHA-256 mismatch" in str(e.value) and url in str(e.value) and "deleted" in str(e.value)
    assert not cache.exists()  # not even the empty downloads/<sha>/ folder


def test_bad_urls(server, cache, monkeypatch):
    monkeypatch.setenv("CMJAX_OPENAI_URL", f"{server.url}/files/decoder.pt")
    with pytest.raises(DownloadError, match="second-to-last path segment must be"):
        resolve_checkpoint("openai", progress=False)
    url = f"{server.url}/{'0' * 64}/decoder.pt"
    monkeypatch.setenv("CMJAX_OPENAI_URL", url)
    with pytest.raises(DownloadError) as e:
        resolve_checkpoint("openai", progress=False)
    assert url in str(e.value) and "Not Found" in str(e.value)
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_cli_downloads_openai(server, decoder_pt, tmp_path):
    """`python -m cmjax.convert openai DST` in a fresh process, with a progress bar."""
    import os
    import subprocess
    import sys

    path, sha = decoder_pt
    env = {**os.environ, "CMJAX_OPENAI_URL": f"{server.url}/diff-vae/{sha}/decoder.pt",
           "CMJAX_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "cmjax.convert", "openai", str(tmp_path / "dst")], env=env,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert res.returncode == 0, res.stderr
    assert "downloading" in res.stderr and "100%" in res.stderr  # tqdm's bar
    assert "OpenAI TorchScript archive" in res.stderr and "wrote" in res.stdout
    assert_same_params(cmjax.load_decoder(tmp_path / "dst"), convert(path, tmp_path / "direct"))


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """The Hub repo as the real one is: a diffusers ConsistencyDecoderVAE in fp16 (here only the
    .fp16 variant file, so the fallback to it is exercised)."""
    import huggingface_hub.constants

    vae = tiny_consistency_vae(seed=5)
    folder = save_vae(vae.half(), tmp_path / "hubrepo", fp16=True)
    server.routes[HUB + "config.json"] = (folder / "config.json").read_bytes()
    server.routes[HUB + "diffusion_pytorch_model.fp16.safetensors"] = (
        folder / "diffusion_pytorch_model.fp16.safetensors").read_bytes()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    yield folder
    for name in ("config.json", "diffusion_pytorch_model.fp16.safetensors"):
        server.routes.pop(HUB + name)


def test_hub_repo_is_fetched_converted_and_cached(server, hub, cache, tmp_path):
    ckpt = resolve_checkpoint("openai/consistency-decoder", progress=False)
    assert ckpt == cache / "checkpoints" / "hf-openai--consistency-decoder"
    assert server.gets(HUB + "config.json") == 1 and server.gets(HUB + "diffusion_pytorch_model.fp16") == 1
    dec = cmjax.load_decoder(ckpt)
    assert {x.dtype for x in jax.tree.leaves(dec.params)} == {np.dtype(np.float32)}  # fp16 upcast
    assert_same_params(dec, convert(hub, tmp_path / "direct"))
    n = len(server.requests)
    assert resolve_checkpoint("openai/consistency-decoder", progress=False) == ckpt
    assert len(server.requests) == n  # converted before: the Hub is not asked again
    # the CLI names the same repo
    assert convert_main(["-q", "openai/consistency-decoder", str(tmp_path / "cli")]) == 0
    assert_same_params(cmjax.load_decoder(tmp_path / "cli"), dec)


def test_hub_failure_is_reported(server, cache, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", server.url)  # serves no repo files: every file is missing
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DownloadError, match="openai/consistency-decoder"):
        resolve_checkpoint("openai/consistency-decoder", progress=False)
    assert not (cache / "checkpoints").exists()


def test_paths_and_unknown_names(decoder_pt, cache, tmp_path):
    path, _ = decoder_pt
    # a cmjax checkpoint is itself
    convert(path, tmp_path / "ckpt")
    assert resolve_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt"
    # a PyTorch file is converted once into the cache
    local = resolve_checkpoint(str(path))
    assert local.parent == cache / "checkpoints" and local.name.startswith("local-decoder.pt-")
    stamp = (local / "cmjax.json").stat().st_mtime_ns
    assert resolve_checkpoint(path) == local and (local / "cmjax.json").stat().st_mtime_ns == stamp
    assert_same_params(cmjax.load_decoder(local), cmjax.load_decoder(tmp_path / "ckpt"))
    # a folder with nothing to convert is left for load_decoder to reject
    (tmp_path / "empty").mkdir()
    assert resolve_checkpoint(tmp_path / "empty") == tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="'openai', 'openai/consistency-decoder'"):
        resolve_checkpoint("openai/other-model")


def test_first_use_decodes_from_what_it_converted(decoder_pt, cache):
    """load_decoder of a PyTorch file converts it into the cache and uses the converted params from
    memory (not read back); later loads read the cache. Same params, same structure, both ways."""
    path, _ = decoder_pt
    first = start_loading_decoder(path)
    assert hasattr(first, "_put")  # the converted params, in memory: nothing read back from the cache
    again = start_loading_decoder(path)
    assert again._decoder is None  # read from the cache, in the background
    assert jax.tree.structure(first.abstract()) == jax.tree.structure(again.abstract())
    assert_same_params(first.decoder(), again.decoder())
    again.check()  # the recorded digest matches
    assert_same_params(cmjax.load_decoder(path), first.decoder())


# --------------------------------------------------------------------------------------------
# Without network access: one message that says what to do instead, at once, and nothing left behind


@pytest.fixture
def dead_port():
    """A loopback port that refuses connections (bound, never listening)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def assert_offline_help(message: str):
    for hint in ("pass its path instead of the name", "python -m cmjax.convert SRC DST", "HF_ENDPOINT",
                 "--vae PATH"):
        assert hint in message, (hint, message)


def test_unreachable_hub_fails_at_once_with_what_to_do(dead_port, cache, monkeypatch, tmp_path):
    """One probe of the endpoint, then the message: huggingface_hub is only asked for cached files
    (with network access it retries for ~25 s, logging every retry twice)."""
    import huggingface_hub
    import huggingface_hub.constants

    calls = []
    real = huggingface_hub.hf_hub_download

    def recording(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{dead_port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DownloadError) as e:
        resolve_checkpoint("openai/consistency-decoder", progress=False)
    assert calls == [True]  # the cache was looked at; no download was attempted
    assert f"cannot reach 127.0.0.1:{dead_port}" in str(e.value)
    assert_offline_help(str(e.value))
    assert not cache.exists() and not any(p.is_file() for p in (tmp_path / "hf").rglob("*"))


def test_hf_hub_offline_fails_before_any_request(server, decoder_pt, cache, monkeypatch, tmp_path):
    import huggingface_hub.constants

    _, sha = decoder_pt
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("CMJAX_OPENAI_URL", f"{server.url}/diff-vae/{sha}/decoder.pt")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    n = len(server.requests)
    for name in ("openai/consistency-decoder", "openai"):
        with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set") as e:
            resolve_checkpoint(name, progress=False)
        assert_offline_help(str(e.value))
    assert len(server.requests) == n and not cache.exists()


def test_unreachable_openai_url_leaves_no_folder(dead_port, cache, monkeypatch):
    url = f"http://127.0.0.1:{dead_port}/diff-vae/{'ab' * 32}/decoder.pt"
    monkeypatch.setenv("CMJAX_OPENAI_URL", url)
    with pytest.raises(DownloadError) as e:
        resolve_checkpoint("openai", progress=False)
    assert url in str(e.value) and "download failed" in str(e.value)
    assert_offline_help(str(e.value))
    assert not cache.exists()  # no empty downloads/<sha>/


def test_cli_offline_error_is_one_line(dead_port, tmp_path):
    """What a user sees: the fetch line, then one error line; no warnings, no retries, no traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{dead_port}", "HF_HUB_CACHE": str(tmp_path / "hf"),
           "CMJAX_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "cmjax.convert", "openai/consistency-decoder", str(tmp_path / "dst")],
                         env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("fetching") and lines[1].startswith("error: "), res.stderr
    assert_offline_help(lines[1])
    assert not (tmp_path / "dst").exists() and not (tmp_path / "cache").exists()


def test_stale_partial_downloads_are_removed(server, decoder_pt, cache, monkeypatch):
    """A download killed mid-way leaves .decoder.pt.part-HOST-PID-XXXX: the next download removes it once that
    process is gone, and leaves the part of a running process (or a recently written one) alone."""
    import os
    import socket
    import subprocess
    import sys
    import time

    _, sha = decoder_pt
    monkeypatch.setenv("CMJAX_OPENAI_URL", f"{server.url}/diff-vae/{sha}/decoder.pt")
    folder = cache / "downloads" / sha
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    old = time.time() - 3600
    host = socket.gethostname()
    stale = folder / f".decoder.pt.part-{host}-{dead_pid}-x1"
    fresh = folder / f".decoder.pt.part-{host}-{dead_pid + 1000000}-x2"  # no such process, but written just now
    alive = folder / f".decoder.pt.part-{host}-{os.getppid()}-x3"
    for part in (stale, fresh, alive):
        part.write_bytes(b"partial")
    os.utime(stale, (old, old))
    os.utime(alive, (old, old))
    from cmjax.weights.hub import fetch_openai_decoder

    assert fetch_openai_decoder(progress=False) == folder / "decoder.pt"
    assert not stale.exists() and fresh.exists() and alive.exists()


# ---------------------------------------------------------------------------------------------
# Bounded in time, and every failure names the URL and the file (issue 24)


def _slow(server, path: str, *, headers_first: bool, interval: float) -> str:
    """A URL whose raw response trickles in one byte every ``interval`` s: the body only, or from the
    status line on."""
    body = b"x" * 10_000
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    server.drip[path] = (head, body, interval) if headers_first else (b"", head + body, interval)
    return server.url + path


def test_a_trickling_server_fails_in_bounded_time(server, tmp_path):
    """A server that sends one byte at a time never trips the per-read timeout: the minimum rate
    stops a slow body, the overall deadline stops even headers that trickle in."""
    import hashlib

    from cmjax.weights import hub

    sha = hashlib.sha256(b"whatever").hexdigest()
    dest = tmp_path / "cache" / sha / "decoder.pt"
    cases = [("/slow-body/decoder.pt", True, dict(min_rate=1000, rate_window=1.0, deadline=60), "download too slow"),
             ("/slow-head/decoder.pt", False, dict(min_rate=0, rate_window=1.0, deadline=1.5),
              "did not finish within 2 s")]
    for path, headers_first, bounds, why in cases:
        url = _slow(server, path, headers_first=headers_first, interval=0.05 if headers_first else 0.3)
        start = time.monotonic()
        with pytest.raises(DownloadError) as e:
            hub.download_verified(url, dest, sha, progress=False, timeout=10, **bounds)
        took = time.monotonic() - start
        message = str(e.value)
        assert took < 15, took
        assert message.startswith(f"{url}: ") and why in message and str(dest) in message and "\n" not in message
        assert not (tmp_path / "cache").exists()  # no part file, no empty folders


def test_a_full_cache_disk_names_the_file_and_url(server, decoder_pt, tmp_path, monkeypatch):
    """ENOSPC while writing (the part file opened on /dev/full): one line with the URL and the file."""
    import os

    from cmjax.weights import download

    _, sha = decoder_pt
    url = f"{server.url}/diff-vae/{sha}/decoder.pt"
    dest = tmp_path / "cache" / sha / "decoder.pt"
    real = download.create_temp

    def full(path, mark):
        fd, tmp = real(path, mark)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), tmp

    monkeypatch.setattr(download, "create_temp", full)
    with pytest.raises(DownloadError) as e:
        download.download_verified(url, dest, sha, progress=False)
    assert str(e.value) == f"{url}: cannot write the download to {dest}: No space left on device"
    assert not (tmp_path / "cache").exists()
