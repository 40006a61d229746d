"""Fetching pretrained checkpoint files safely, with a cache.

A manifest entry's ``source`` says where a checkpoint comes from; :func:`fetch` returns
it on local disk, downloading it once:

- ``{"hf": {"repo": "org/name", "files": [...], "optional": [...], "revision": "main"}}``:
  the Hugging Face hub through ``huggingface_hub`` (its cache, resume and offline
  handling). An entry of ``files`` may itself be a list of alternatives, the first one
  available is taken (``["model.safetensors", "pytorch_model.bin"]``); ``optional``
  files are fetched when they exist. Returns the snapshot directory.
- ``{"url": "https://.../file.pth", "sha256": "<hex>" | None, "filename": optional}``:
  a plain URL (``file://`` too), cached as
  ``$VLZOO_HOME/downloads/<sha256(url)[:16]>/<filename>``. Returns the file.
- ``{"open_clip": {"name": "ViT-B-32", "tag": "openai", "prefer": "hf" | "url"}}``:
  open_clip's pretrained table, resolved into one of the two above.
- ``{"zoo": "clip/shapes-tiny"}``: a vlzoo-trained artefact (trained on first use).

URL downloads stream into ``<file>.part`` (resumed with an HTTP ``Range`` request
when the server allows it), are checked against their sha256 before an atomic rename
into place, and a ``<file>.sha256`` sidecar (``sha256sum`` format) records the digest
so a cached file is hashed once only. A download whose digest is wrong leaves nothing
behind. Hugging Face files are checked the same way, once, after download.

Offline (``VLZOO_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) only the cache is used;
``file://`` URLs still work. A checkpoint that is neither cached nor reachable raises
:class:`CheckpointUnavailableError`, which says where it comes from, where it would
be cached and how to bring it over.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from vlzoo import artefacts
from vlzoo.utils import atomic_write_text, file_lock, vlzoo_home

SOURCE_KINDS = ("hf", "url", "open_clip", "zoo")
CHUNK_SIZE = 1 << 20
TIMEOUT_S = 60.0
PROGRESS_DELAY_S = 1.0  # progress bars appear only for downloads slower than this
HF_ENDPOINT = "https://huggingface.co"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TRUE = {"1", "true", "yes", "on"}
_HEX = re.compile(r"[0-9a-f]+")


class CheckpointUnavailableError(RuntimeError):
    """A checkpoint is not cached and cannot be downloaded (offline or unreachable)."""


class ChecksumError(ValueError):
    """A file's sha256 differs from the expected one."""

    def __init__(self, file: str | os.PathLike, expected: str, actual: str, name: str | None = None):
        self.file, self.expected, self.actual = str(file), expected, actual
        owner = f" (checkpoint {name!r})" if name else ""
        super().__init__(f"{self.file}{owner}: sha256 mismatch: expected {expected}, got {actual}; "
                         "the file was removed from the cache")


# ----------------------------------------------------------------------------- public API


def is_offline() -> bool:
    """Whether ``VLZOO_OFFLINE``, ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set."""
    names = ("VLZOO_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(n, "").strip().lower() in _TRUE for n in names)


PROBE_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@lru_cache(maxsize=16)
def _host_problem(host: str, port: int) -> str | None:
    """Name lookup and connection together within :data:`PROBE_TIMEOUT_S` (a lookup alone
    can hang for much longer on a machine whose DNS server does not answer)."""
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{host}:{port} cannot be reached ({err})")

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(PROBE_TIMEOUT_S + 0.5)
    return outcome[0] if outcome else f"{host}:{port} cannot be reached (no answer within {PROBE_TIMEOUT_S:.0f} s)"


def unreachable(url: str) -> str | None:
    """Why ``url``'s server cannot be reached (one TCP connection, at most
    :data:`PROBE_TIMEOUT_S` seconds, remembered for the process), or None. Without it a
    machine with no network waits minutes on the hub client's retries. Not probed through
    a proxy (the proxy decides)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or any(os.environ.get(v) for v in
                                                                             _PROXY_VARIABLES):
        return None
    return _host_problem(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80))


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub (``HF_ENDPOINT``) cannot be reached, or None."""
    return unreachable(os.environ.get("HF_ENDPOINT") or HF_ENDPOINT)


def hub_local_only() -> bool:
    """Use the hub cache alone: offline mode is on, or the hub cannot be reached."""
    return is_offline() or hub_unreachable() is not None


def fetch(name: str, source: dict, sha256: dict[str, str] | None = None, progress: bool = True) -> Path:
    """The checkpoint ``name`` on local disk: a file (url, zoo) or a directory (hf).

    ``sha256`` maps file names to expected hex digests (a prefix of 8+ digits is
    accepted); a mismatch removes the file from the cache and raises
    :class:`ChecksumError`. Raises :class:`CheckpointUnavailableError` when the
    checkpoint is neither cached nor downloadable.
    """
    source = resolve_source(source)
    kind = source_kind(source)
    if kind == "hf":
        return _fetch_hf(name, source["hf"], sha256 or {}, progress)
    if kind == "url":
        return _fetch_url(name, source, sha256 or {}, progress)
    return artefacts.artefact_checkpoint(_zoo_reference(source["zoo"]))


def download_to(url: str, target: Path, name: str, sha256: str | None = None, progress: bool = True) -> Path:
    """``url`` into ``target`` (a data file, not a checkpoint: no cache), resumable through
    ``<target>.part``, verified against ``sha256`` when given; its digest is recorded beside
    it. A target already there (and matching ``sha256``) is kept."""
    target = Path(target)
    expected = _normalise_digest(sha256, target.name)
    if target.is_file() and _cached_file_ok(target, expected):
        return target
    _check_reachable(name, url, target, _data_unavailable)
    _download(name, url, target, expected, progress, _data_unavailable)
    return target


def _data_unavailable(name: str, where: str, target: str | os.PathLike, reason: str) -> CheckpointUnavailableError:
    return CheckpointUnavailableError(f"{name}: cannot download {where} into {target}: {reason}")


def cached_path(name: str, source: dict, sha256: dict[str, str] | None = None) -> Path | None:
    """Where :func:`fetch` would find ``source`` without the network, or ``None``.

    Nothing is hashed; a URL file whose recorded digest contradicts ``sha256`` counts
    as not cached. A zoo artefact not trained yet is ``None`` (it is not trained here).
    """
    source = resolve_source(source)
    kind = source_kind(source)
    if kind == "url":
        target = url_cache_path(source)
        expected = _expected_url_digest(source, target.name, sha256 or {})
        recorded = _recorded_digest(target, _sidecar(target))
        if not target.is_file() or (expected and recorded and not _digest_matches(recorded, expected)):
            return None
        return target
    if kind == "zoo":
        path = artefacts.artefact_dir(_zoo_reference(source["zoo"])) / artefacts.CHECKPOINT_NAME
        return path if path.is_file() else None
    try:
        return _hf_snapshot(name, source["hf"], progress=False, local_only=True)[0]
    except (CheckpointUnavailableError, FileNotFoundError):
        return None


def source_kind(source: dict) -> str:
    """Which of :data:`SOURCE_KINDS` ``source`` is (exactly one key must be present)."""
    kinds = [k for k in SOURCE_KINDS if k in source] if isinstance(source, dict) else []
    if len(kinds) != 1:
        raise ValueError(f"checkpoint source must have exactly one of {SOURCE_KINDS}, got {source!r}")
    return kinds[0]


def resolve_source(source: dict) -> dict:
    """``source`` with an ``open_clip`` entry replaced by the hf or url source it names."""
    if source_kind(source) != "open_clip":
        return source
    spec = source["open_clip"]
    return open_clip_source(spec["name"], spec["tag"], prefer=spec.get("prefer", "hf"))


def open_clip_source(model: str, tag: str, prefer: str = "hf") -> dict:
    """The hf or url source of open_clip's pretrained weights ``model``/``tag``.

    Hub weights are preferred when both exist (``prefer="url"`` inverts that). The
    sha256 embedded in OpenAI and open_clip release URLs becomes the url's ``sha256``.
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise ValueError(f"open_clip has no pretrained weights {model!r} with tag {tag!r}")
    hub, url = cfg.get("hf_hub") or "", cfg.get("url") or ""
    if cfg.get("file"):
        return {"url": Path(cfg["file"]).expanduser().resolve().as_uri(), "sha256": None}
    if hub and (prefer != "url" or not url):
        return {"hf": _open_clip_hf_spec(hub)}
    if url:
        return {"url": url, "sha256": _digest_in_url(url)}
    raise ValueError(f"open_clip weights {model!r}/{tag!r} name neither a hub repo nor a URL: {cfg}")


def url_cache_path(source: dict) -> Path:
    """Where the file of a url source is cached (it may not exist)."""
    url = source["url"]
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return vlzoo_home() / "downloads" / key / _url_filename(source)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        _hash_stream(handle, digest)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- digests


def _hash_stream(handle: BinaryIO, digest: Any) -> None:
    while chunk := handle.read(CHUNK_SIZE):
        digest.update(chunk)


def _normalise_digest(expected: str | None, what: str) -> str | None:
    if not expected:
        return None
    expected = expected.strip().lower()
    if len(expected) < 8 or len(expected) > 64 or not _HEX.fullmatch(expected):
        raise ValueError(f"{what}: expected sha256 {expected!r} is not 8 to 64 hex digits")
    return expected


def _digest_matches(actual: str, expected: str) -> bool:
    return actual.lower().startswith(expected.lower())


def _recorded_digest(path: Path, record: Path) -> str | None:
    """The digest in ``record`` if it is no older than ``path`` (else it is stale)."""
    try:
        if record.stat().st_mtime_ns < path.stat().st_mtime_ns:
            return None
        return record.read_text().split()[0].lower()
    except (OSError, IndexError):
        return None


def _record_digest(path: Path, record: Path, digest: str) -> None:
    try:
        atomic_write_text(record, f"{digest}  {path.name}\n")
    except OSError:
        pass  # a read-only cache: the file is simply hashed again next time


def _known_digest(path: Path, record: Path) -> str:
    """The file's sha256, from its record when fresh, else hashed and recorded."""
    digest = _recorded_digest(path, record)
    if digest is None:
        digest = file_sha256(path)
        _record_digest(path, record, digest)
    return digest


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# ----------------------------------------------------------------------------- url sources


def _url_filename(source: dict) -> str:
    given = source.get("filename")
    if given:
        if given in (".", "..") or "/" in given or "\\" in given:
            raise ValueError(f"url source filename {given!r} must be a plain file name")
        return given
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(source["url"]).path)).name
    return name if name not in ("", ".", "..") else "download"


def _expected_url_digest(source: dict, filename: str, sha256: dict[str, str]) -> str | None:
    inline = _normalise_digest(source.get("sha256"), filename)
    listed = _normalise_digest(sha256.get(filename), filename)
    if inline and listed and not (inline.startswith(listed) or listed.startswith(inline)):
        raise ValueError(f"{filename}: the source says sha256 {inline} but the manifest says {listed}")
    return max(inline or "", listed or "", key=len) or None


def _fetch_url(name: str, source: dict, sha256: dict[str, str], progress: bool) -> Path:
    target = url_cache_path(source)
    expected = _expected_url_digest(source, target.name, sha256)
    with file_lock(target.parent.with_name(target.parent.name + ".lock")):
        if target.is_file():
            if _cached_file_ok(target, expected):
                return target
            target.unlink()  # a different file than the manifest names: fetch it anew
            _sidecar(target).unlink(missing_ok=True)
        url = source["url"]
        _check_reachable(name, url, target, _unavailable)
        _download(name, url, target, expected, progress)
    return target


def _check_reachable(name: str, url: str, target: Path, unavailable: Callable[..., Exception]) -> None:
    """Raise ``unavailable(...)`` when offline mode is on or ``url``'s server cannot be
    reached (a ``file://`` URL always can)."""
    if urllib.parse.urlparse(url).scheme == "file":
        return
    if is_offline():
        raise unavailable(name, url, target, "offline mode is on (VLZOO_OFFLINE / HF_HUB_OFFLINE)")
    problem = unreachable(url)
    if problem:
        raise unavailable(name, url, target, problem)


def _cached_file_ok(target: Path, expected: str | None) -> bool:
    """Whether the cached file is the expected one (hashed once, then from the sidecar)."""
    if expected is None:
        return True
    return _digest_matches(_known_digest(target, _sidecar(target)), expected)


def _download(name: str, url: str, target: Path, expected: str | None, progress: bool,
              unavailable: Callable[..., Exception] | None = None) -> None:
    """Stream ``url`` into ``<target>.part`` (resuming it), verify, then rename into place."""
    unavailable = unavailable or _unavailable
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        _stream_into(name, url, part, digest, progress)
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as err:
        if isinstance(err, urllib.error.HTTPError) and err.code in (404, 410):
            raise FileNotFoundError(f"{name!r}: {url} answered HTTP {err.code}") from err
        kept = " (the partial file is kept; fetching again resumes it)" if part.exists() else ""
        raise unavailable(name, url, target, f"download failed: {err}{kept}") from err
    actual = digest.hexdigest()
    if expected and not _digest_matches(actual, expected):
        part.unlink(missing_ok=True)
        _remove_if_empty(target.parent)
        raise ChecksumError(target, expected, actual, name)
    os.replace(part, target)
    _record_digest(target, _sidecar(target), actual)


def _stream_into(name: str, url: str, part: Path, digest: Any, progress: bool) -> None:
    offset = part.stat().st_size if part.is_file() else 0
    response = _open_url(url, offset)
    with response:
        try:
            start = _resume_offset(response, offset)
        except http.client.HTTPException:
            part.unlink()  # the next attempt starts from the beginning
            raise
        if start:
            with open(part, "rb") as handle:
                _hash_stream(handle, digest)
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        with open(part, "ab" if start else "wb") as out, _progress_bar(name, total, start, progress) as bar:
            while chunk := response.read(CHUNK_SIZE):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def _open_url(url: str, offset: int) -> Any:
    """Open ``url``, asking for the bytes from ``offset`` on; a refused range restarts."""
    request = urllib.request.Request(url, headers={"User-Agent": "vlzoo"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if offset and err.code == 416:  # the partial file does not fit the remote one
            err.close()
            return _open_url(url, 0)
        raise


def _resume_offset(response: Any, offset: int) -> int:
    """``offset`` if the server resumed there (HTTP 206 from that byte), else 0."""
    if not offset or getattr(response, "status", None) != 206:
        return 0
    match = re.match(r"bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != offset:
        raise http.client.HTTPException(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
    return offset


@contextmanager
def _progress_bar(name: str, total: int | None, initial: int, progress: bool) -> Iterator[Any]:
    from tqdm import tqdm

    disable = True if not progress else None  # None: tqdm hides itself off a terminal
    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
              desc=name, disable=disable, delay=PROGRESS_DELAY_S, file=sys.stderr) as bar:
        yield bar


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass




# ----------------------------------------------------------------------------- hf sources


def _fetch_hf(name: str, spec: dict, sha256: dict[str, str], progress: bool) -> Path:
    snapshot, fetched = _hf_snapshot(name, spec, progress, local_only=hub_local_only())
    for filename, path in fetched.items():
        expected = _normalise_digest(sha256.get(filename), filename)
        if expected:
            _verify_hf_file(name, filename, path, expected)
    return snapshot


def _hf_snapshot(name: str, spec: dict, progress: bool, local_only: bool) -> tuple[Path, dict[str, Path]]:
    """Fetch every file of an hf spec; the snapshot directory and ``{filename: path}``."""
    fetched: dict[str, Path] = {}
    for entry in spec.get("files", []):
        choices = [entry] if isinstance(entry, str) else list(entry)
        filename, path = _hf_first_available(name, spec, choices, progress, local_only)
        fetched[filename] = path
    for filename in spec.get("optional", []):
        try:
            fetched[filename] = _hf_first_available(name, spec, [filename], progress, local_only)[1]
        except (CheckpointUnavailableError, FileNotFoundError):
            pass
    if not fetched:
        raise ValueError(f"checkpoint {name!r}: hf source of {spec.get('repo')!r} lists no files")
    filename, path = next(iter(fetched.items()))
    return path.parents[len(Path(filename).parts) - 1], fetched


def _hf_first_available(name: str, spec: dict, choices: list[str], progress: bool,
                        local_only: bool) -> tuple[str, Path]:
    """The first of ``choices`` the hub (or its cache) has."""
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    reasons = []
    for filename in choices:
        try:
            return filename, _hf_download(spec, filename, progress, local_only)
        except RemoteEntryNotFoundError:
            reasons.append(f"{filename}: not in the repository")
        except LocalEntryNotFoundError as err:
            reasons.append(f"{filename}: {_hf_reason(err, local_only)}")
        except _hf_failures() as err:  # repository missing or gated, hub or network errors
            reasons.append(f"{filename}: {err}")
    if all(r.endswith("not in the repository") for r in reasons):
        raise FileNotFoundError(f"checkpoint {name!r}: {' / '.join(choices)} not found in "
                                f"{HF_ENDPOINT}/{spec['repo']} (revision {spec.get('revision', 'main')})")
    raise _unavailable(name, _hf_url(spec, choices), _hf_repo_cache(spec, choices), "; ".join(reasons))


def _hf_download(spec: dict, filename: str, progress: bool, local_only: bool) -> Path:
    from huggingface_hub import hf_hub_download

    kwargs: dict[str, Any] = {} if progress else {"tqdm_class": _silent_tqdm()}
    path = hf_hub_download(repo_id=spec["repo"], filename=filename, revision=spec.get("revision"),
                           cache_dir=hf_cache_dir(), local_files_only=local_only,
                           library_name="vlzoo", **kwargs)
    return Path(path)


def _hf_failures() -> tuple[type[BaseException], ...]:
    """Errors of a hub download that mean "not available now" rather than a bug."""
    from huggingface_hub.errors import HfHubHTTPError

    failures: tuple[type[BaseException], ...] = (HfHubHTTPError, OSError)
    try:
        import httpx

        failures += (httpx.HTTPError,)
    except ImportError:
        pass
    return failures


def _silent_tqdm() -> type:
    from huggingface_hub.utils import tqdm

    class SilentTqdm(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


def _hf_reason(err: Exception, local_only: bool) -> str:
    if local_only and not is_offline() and hub_unreachable():
        return f"not in the local cache and the hub cannot be reached: {hub_unreachable()}"
    if local_only:
        return "not in the local cache and offline mode is on (VLZOO_OFFLINE / HF_HUB_OFFLINE)"
    return f"not in the local cache and the hub is unreachable ({err.__cause__ or err})"


def _hf_url(spec: dict, choices: list[str]) -> str:
    revision = spec.get("revision") or "main"
    return " or ".join(f"{HF_ENDPOINT}/{spec['repo']}/resolve/{revision}/{f}" for f in choices)


def _hf_repo_cache(spec: dict, choices: list[str]) -> str:
    folder = hf_cache_dir() / ("models--" + spec["repo"].replace("/", "--"))
    return f"{folder}/snapshots/<commit>/{' or '.join(choices)}"


def _hf_record(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return vlzoo_home() / "verified" / "hf" / f"{key}.sha256"


def _verify_hf_file(name: str, filename: str, path: Path, expected: str) -> None:
    """Check a hub file once (recorded under ``$VLZOO_HOME/verified``); a bad one is
    removed from the hub cache (its blob and snapshot link) where permitted."""
    blob, record = path.resolve(), _hf_record(path)
    actual = _known_digest(blob, record)
    if _digest_matches(actual, expected):
        return
    for bad in (path, blob, record):
        try:
            bad.unlink(missing_ok=True)
        except OSError:
            pass
    raise ChecksumError(f"{filename} ({path})", expected, actual, name)


# ----------------------------------------------------------------------------- other sources


def _open_clip_hf_spec(hub: str) -> dict:
    """open_clip's ``org/name/`` (default files) or ``org/name/file.bin`` as an hf spec."""
    parts = hub.strip("/").split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if not filename:
        return {"repo": repo, "files": [list(OPEN_CLIP_WEIGHTS)], "optional": [OPEN_CLIP_CONFIG]}
    if filename == OPEN_CLIP_WEIGHTS[1]:
        return {"repo": repo, "files": [list(OPEN_CLIP_WEIGHTS)]}
    if filename.endswith((".bin", ".pth")):
        return {"repo": repo, "files": [[filename[:-4] + ".safetensors", filename]]}
    return {"repo": repo, "files": [filename]}


def _digest_in_url(url: str) -> str | None:
    """The sha256 (or its prefix) that OpenAI and open_clip release URLs carry."""
    parsed = urllib.parse.urlparse(url)
    segments = [s.lower() for s in parsed.path.split("/") if s]
    for segment in segments:
        if len(segment) == 64 and _HEX.fullmatch(segment):
            return segment
    if parsed.netloc == "github.com" and segments[:1] == ["mlfoundations"]:
        tail = Path(segments[-1]).stem.rsplit("-", 1)[-1]
        if 8 <= len(tail) <= 64 and _HEX.fullmatch(tail):
            return tail
    return None


def _zoo_reference(value: str) -> str:
    return value if artefacts.is_zoo_reference(value) else artefacts.ZOO_PREFIX + value


def _unavailable(name: str, where: str, cache: str | os.PathLike, reason: str) -> CheckpointUnavailableError:
    root = vlzoo_home() if str(cache).startswith(str(vlzoo_home())) else hf_cache_dir()
    return CheckpointUnavailableError(
        f"checkpoint {name!r} is not cached and cannot be downloaded: {reason}.\n"
        f"  source: {where}\n"
        f"  cache:  {cache}\n"
        f"To get it, run `vlzoo download {name}` on a machine with network access, then copy "
        f"its cache directory ({root}) to the same place here (or point $VLZOO_HOME / "
        f"$HF_HUB_CACHE at the copy)."
    )



HF_REPO_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*")


def _hf_snapshot_files(label: str, repo: str, revision: str | None, patterns: tuple[str, ...],
                       progress: bool) -> Path:
    """The files of hub ``repo`` matching ``patterns``, as a local snapshot (offline:
    from the cache only); unavailable -> :class:`CheckpointUnavailableError` naming ``label``."""
    from huggingface_hub import snapshot_download

    local_only = hub_local_only()
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(patterns), cache_dir=hf_cache_dir(),
                                      local_files_only=local_only, tqdm_class=None if progress else _silent_tqdm()))
    except _hf_failures() as err:
        folder = hf_cache_dir() / ("models--" + repo.replace("/", "--"))
        raise _unavailable(label, f"{HF_ENDPOINT}/{repo}", folder, _hf_reason(err, local_only)) from err


def fetch_hf_repo(reference: str, progress: bool = True) -> Path:
    """``org/repo[@revision]`` (what ``hf://`` names): the model files of a whole hub
    repository (configs, safetensors weights, tokenizer files), as a local snapshot."""
    repo, _, revision = reference.partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ValueError(f"hf://{reference}: expected hf://org/name[@revision]")
    return _hf_snapshot_files(f"hf://{reference}", repo, revision or None, HF_REPO_PATTERNS, progress)


TOKENIZER_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "*.model", "special_tokens_map.json",
                      "added_tokens.json", "config.json")
BUILTIN_TOKENIZERS = ("shapes", "open_clip")


def fetch_tokenizer(name: str, progress: bool = True) -> Path | None:
    """The tokenizer files of a Hugging Face repository (no weights), so that a model
    whose config names the tokenizer (``bert-base-uncased`` for ALBEF/BLIP) loads
    offline later; None for vlzoo's built-in tokenizers and local directories."""
    if name in BUILTIN_TOKENIZERS or Path(name).exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return None
    return _hf_snapshot_files(f"tokenizer {name}", name, None, TOKENIZER_PATTERNS, progress)
