"""Checkpoint downloads: a local HTTP server stands in for the network, a hand-built
Hugging Face cache for the hub."""

from __future__ import annotations

import hashlib
import sys
import threading
import types
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vlzoo.hub import download
from vlzoo.hub.download import (
    CheckpointUnavailableError,
    ChecksumError,
    cached_path,
    fetch,
    open_clip_source,
    resolve_source,
    url_cache_path,
)

PAYLOAD = bytes(range(256)) * 64  # 16 KiB of fake checkpoint
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
COMMIT = "a" * 40


class FakeServer:
    """Serves ``files`` over HTTP on 127.0.0.1, counting requests and recording Range headers."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True):
        self.files, self.ranges = files, ranges
        self.requests: Counter[str] = Counter()
        self.range_headers: list[str | None] = []
        self.truncate_next = False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests[self.path] += 1
                server.range_headers.append(self.headers.get("Range"))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = self._range_start()
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.truncate_next:  # the connection drops half-way
                    server.truncate_next = False
                    self.wfile.write(body[start:len(body) // 2])
                    return
                self.wfile.write(body[start:])

            def _range_start(self) -> int:
                header = self.headers.get("Range")
                if not (server.ranges and header and header.startswith("bytes=")):
                    return 0
                return int(header.removeprefix("bytes=").split("-")[0])

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("VLZOO_OFFLINE", raising=False)


@pytest.fixture()
def server() -> Iterator[FakeServer]:
    with FakeServer({"/ckpt/model.pth": PAYLOAD}) as running:
        yield running


def url_source(server: FakeServer, sha256: str | None = DIGEST) -> dict:
    return {"url": server.url("/ckpt/model.pth"), "sha256": sha256}


# ----------------------------------------------------------------------------- url sources


def test_url_download_is_verified_then_served_from_cache(server: FakeServer) -> None:
    source = url_source(server)
    assert cached_path("m", source) is None
    path = fetch("m", source, progress=False)
    assert path == url_cache_path(source)
    assert path.parent.parent == download.vlzoo_home() / "downloads"
    assert path.read_bytes() == PAYLOAD
    assert path.with_name("model.pth.sha256").read_text().split()[0] == DIGEST
    assert not path.with_name("model.pth.part").exists()
    assert fetch("m", source, progress=False) == path
    assert server.requests["/ckpt/model.pth"] == 1
    assert cached_path("m", source) == path


def test_manifest_digest_is_checked_for_url_files(server: FakeServer) -> None:
    source = url_source(server, sha256=None)
    assert fetch("m", source, sha256={"model.pth": DIGEST}, progress=False).read_bytes() == PAYLOAD
    with pytest.raises(ValueError, match="manifest"):
        fetch("m", url_source(server, sha256="0" * 64), sha256={"model.pth": DIGEST})


def test_wrong_sha256_raises_and_leaves_nothing(server: FakeServer) -> None:
    source = url_source(server, sha256="0" * 64)
    with pytest.raises(ChecksumError) as err:
        fetch("m", source, progress=False)
    message = str(err.value)
    assert "model.pth" in message and "0" * 64 in message and DIGEST in message
    target = url_cache_path(source)
    assert not target.exists() and not target.with_name("model.pth.part").exists()
    assert not target.parent.exists() or not any(target.parent.iterdir())


def test_partial_file_is_resumed_with_a_range_request(server: FakeServer) -> None:
    source = url_source(server)
    part = url_cache_path(source).with_name("model.pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[: len(PAYLOAD) // 2])
    path = fetch("m", source, progress=False)
    assert server.range_headers == [f"bytes={len(PAYLOAD) // 2}-"]
    assert path.read_bytes() == PAYLOAD and not part.exists()


def test_interrupted_download_keeps_the_part_and_resumes(server: FakeServer) -> None:
    source = url_source(server)
    server.truncate_next = True
    with pytest.raises(CheckpointUnavailableError, match="resumes"):
        fetch("m", source, progress=False)
    part = url_cache_path(source).with_name("model.pth.part")
    assert part.stat().st_size == len(PAYLOAD) // 2
    assert fetch("m", source, progress=False).read_bytes() == PAYLOAD
    assert server.range_headers == [None, f"bytes={len(PAYLOAD) // 2}-"]


def test_server_without_ranges_restarts_from_zero() -> None:
    with FakeServer({"/ckpt/model.pth": PAYLOAD}, ranges=False) as server:
        source = url_source(server)
        part = url_cache_path(source).with_name("model.pth.part")
        part.parent.mkdir(parents=True)
        part.write_bytes(b"stale bytes")
        assert fetch("m", source, progress=False).read_bytes() == PAYLOAD


def test_offline_and_not_cached_names_name_url_and_cache(server: FakeServer, monkeypatch) -> None:
    monkeypatch.setenv("VLZOO_OFFLINE", "1")
    source = url_source(server)
    with pytest.raises(CheckpointUnavailableError) as err:
        fetch("clip-test", source)
    message = str(err.value)
    assert "clip-test" in message and source["url"] in message
    assert str(url_cache_path(source)) in message and "vlzoo download clip-test" in message
    assert server.requests["/ckpt/model.pth"] == 0


def test_offline_but_cached_works(server: FakeServer, monkeypatch) -> None:
    source = url_source(server)
    path = fetch("m", source, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch("m", source) == path
    assert server.requests["/ckpt/model.pth"] == 1


def test_unreachable_host_is_unavailable() -> None:
    with FakeServer({}) as server:
        url = server.url("/gone.pth")
    with pytest.raises(CheckpointUnavailableError, match="gone.pth"):
        fetch("m", {"url": url, "sha256": None}, progress=False)


def test_missing_remote_file_is_file_not_found(server: FakeServer) -> None:
    with pytest.raises(FileNotFoundError, match="404"):
        fetch("m", {"url": server.url("/nope.pth")}, progress=False)


def test_file_url_is_copied_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VLZOO_OFFLINE", "1")
    local = tmp_path / "weights.bin"
    local.write_bytes(PAYLOAD)
    source = {"url": local.as_uri(), "sha256": DIGEST, "filename": "renamed.bin"}
    path = fetch("m", source, progress=False)
    assert path.name == "renamed.bin" and path.read_bytes() == PAYLOAD


def test_cached_file_with_another_digest_is_fetched_again(server: FakeServer) -> None:
    source = url_source(server)
    path = fetch("m", source, progress=False)
    path.write_bytes(b"tampered")  # newer than its sidecar: hashed again, found wrong
    assert fetch("m", source, progress=False).read_bytes() == PAYLOAD
    assert server.requests["/ckpt/model.pth"] == 2


# ----------------------------------------------------------------------------- hf sources


def hf_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A hub cache in huggingface_hub's layout: blobs, refs/main, snapshot links."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    for name, body in files.items():
        blob = folder / "blobs" / hashlib.sha256(body).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(body)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(blob)
    return snapshot


def test_hf_offline_not_cached_names_repo_and_file(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = {"hf": {"repo": "org/tiny", "files": ["model.safetensors"]}}
    with pytest.raises(CheckpointUnavailableError) as err:
        fetch("hf-tiny", source)
    message = str(err.value)
    assert "hf-tiny" in message and "https://huggingface.co/org/tiny" in message
    assert "model.safetensors" in message and "models--org--tiny" in message
    assert cached_path("hf-tiny", source) is None


def test_hf_offline_from_populated_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hf_cache(tmp_path / "hf", "org/tiny", {"config.json": b"{}", "model.safetensors": PAYLOAD})
    source = {"hf": {"repo": "org/tiny", "files": ["config.json", "model.safetensors"],
                     "optional": ["README.md"], "revision": "main"}}
    assert fetch("hf-tiny", source, sha256={"model.safetensors": DIGEST}) == snapshot
    assert cached_path("hf-tiny", source) == snapshot
    assert any((download.vlzoo_home() / "verified" / "hf").iterdir())  # hashed once, recorded


def test_hf_checksum_mismatch_removes_the_blob(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hf_cache(tmp_path / "hf", "org/tiny", {"model.safetensors": PAYLOAD})
    blob = (snapshot / "model.safetensors").resolve()
    source = {"hf": {"repo": "org/tiny", "files": ["model.safetensors"]}}
    with pytest.raises(ChecksumError, match="model.safetensors"):
        fetch("hf-tiny", source, sha256={"model.safetensors": "f" * 64})
    assert not blob.exists() and not (snapshot / "model.safetensors").exists()


def test_hf_alternatives_take_the_first_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VLZOO_OFFLINE", "1")
    snapshot = hf_cache(tmp_path / "hf", "org/oc", {"open_clip_pytorch_model.bin": PAYLOAD})
    source = {"hf": download._open_clip_hf_spec("org/oc/")}
    assert fetch("oc", source) == snapshot


# ----------------------------------------------------------------------------- open_clip, zoo


def test_open_clip_entries_map_to_hf_or_url(monkeypatch) -> None:
    table = {
        ("A", "hub"): {"hf_hub": "org/a/", "url": ""},
        ("B", "hubfile"): {"hf_hub": "org/b/weights.bin", "url": ""},
        ("C", "openai"): {"hf_hub": "timm/c.openai/",
                          "url": f"https://openaipublic.azureedge.net/clip/models/{DIGEST}/C.pt"},
        ("D", "laion"): {"hf_hub": "", "url": "https://github.com/mlfoundations/open_clip/"
                                              "releases/download/v0.2-weights/d-laion-d867053b.pt"},
    }
    fake = types.ModuleType("open_clip")  # importing the real one takes seconds
    fake.get_pretrained_cfg = lambda name, tag: table.get((name, tag), {})
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    assert open_clip_source("A", "hub") == {"hf": {
        "repo": "org/a", "files": [["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]],
        "optional": ["open_clip_config.json"]}}
    assert open_clip_source("B", "hubfile")["hf"]["files"] == [["weights.safetensors", "weights.bin"]]
    assert open_clip_source("C", "openai")["hf"]["repo"] == "timm/c.openai"
    assert open_clip_source("C", "openai", prefer="url")["sha256"] == DIGEST
    assert open_clip_source("D", "laion")["sha256"] == "d867053b"
    assert resolve_source({"open_clip": {"name": "C", "tag": "openai", "prefer": "url"}})["url"].endswith("C.pt")
    with pytest.raises(ValueError, match="no pretrained"):
        open_clip_source("Z", "none")


def test_zoo_source_uses_the_artefact(tmp_path: Path, monkeypatch) -> None:
    ckpt = tmp_path / "model.ckpt"
    seen = []
    monkeypatch.setattr(download.artefacts, "artefact_checkpoint", lambda ref: seen.append(ref) or ckpt)
    assert fetch("clip-shapes", {"zoo": "clip/shapes-tiny"}) == ckpt
    assert seen == ["zoo:clip/shapes-tiny"]


def test_bad_sources_are_rejected() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        fetch("m", {"url": "http://x/y", "hf": {}})
    with pytest.raises(ValueError, match="hex"):
        fetch("m", {"url": "http://127.0.0.1:9/y.pt", "sha256": "not-a-digest"})


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_hub_fails_in_seconds_without_retries(tmp_path: Path, monkeypatch) -> None:
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("VLZOO_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    download._host_problem.cache_clear()
    source = {"hf": {"repo": "org/tiny", "files": ["model.safetensors"]}}
    start = time.monotonic()
    with pytest.raises(CheckpointUnavailableError, match="the hub cannot be reached") as err:
        fetch("hf-tiny", source, progress=False)
    assert time.monotonic() - start < 5 and "vlzoo download" in str(err.value)
    with pytest.raises(CheckpointUnavailableError, match="cannot be reached"):
        download.fetch_tokenizer("org/tokenizer", progress=False)
    assert time.monotonic() - start < 10
    snapshot = hf_cache(tmp_path / "hf", "org/tiny", {"model.safetensors": PAYLOAD})  # cached: served offline
    assert fetch("hf-tiny", source, progress=False) == snapshot


def test_an_unreachable_url_host_fails_at_once(monkeypatch) -> None:
    monkeypatch.delenv("VLZOO_OFFLINE", raising=False)
    download._host_problem.cache_clear()
    url = f"http://127.0.0.1:{_closed_port()}/model.pth"
    assert "cannot be reached" in download.unreachable(url)
    with pytest.raises(CheckpointUnavailableError, match="cannot be reached"):
        fetch("m", {"url": url, "sha256": None}, progress=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert download.unreachable("https://example.org/x") is None  # through a proxy: the proxy decides
