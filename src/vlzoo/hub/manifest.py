"""``checkpoints_manifest.yaml``: one entry per pretrained checkpoint, validated.

An entry names the checkpoint (``clip-``/``albef-``/``blip-``/``blip2-`` prefix), the
zoo config it instantiates, where its weights come from (``source``), their sha256
where known, its preprocessing, tokenizer, license, paper and the published figure it
should reproduce. :func:`validate_entry` says exactly which field of which entry is
wrong.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from vlzoo import families
from vlzoo.eval.names import BENCHMARK_KEYS

MANIFEST_NAME = "checkpoints_manifest.yaml"
WEIGHT_FORMATS = ("open_clip", "hf", "vlzoo")  # besides the original releases the families convert


def name_prefixes() -> tuple[str, ...]:
    """A manifest name starts with its family's stem (``blip_vqa`` -> ``blip-``)."""
    return tuple(sorted({f"{name.split('_')[0]}-" for name in families.names()}))


def formats() -> tuple[str, ...]:
    originals = [f.original_format for f in families.all_families().values() if f.original_format]
    return (*WEIGHT_FORMATS, *originals)
SOURCE_KINDS = ("hf", "url", "open_clip", "zoo")
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "squash")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_config.json")
REQUIRED = ("name", "family", "config", "format", "source", "preprocess", "tokenizer", "license", "paper", "metric")
OPTIONAL = ("sha256", "description", "notes")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest entry is malformed; the message names the entry and the field."""


@dataclass(frozen=True)
class ManifestEntry:
    """One validated manifest entry (fields as in the YAML)."""

    name: str
    family: str
    config: str
    format: str
    source: dict[str, Any]
    preprocess: dict[str, Any]
    tokenizer: str
    license: str
    paper: str
    metric: dict[str, Any]
    sha256: dict[str, str] | None = None
    description: str = ""
    notes: str = ""

    @property
    def source_description(self) -> str:
        """Where the weights come from, for messages."""
        kind, value = next(iter(self.source.items()))
        if kind == "hf":
            return f"https://huggingface.co/{value['repo']} (files {value.get('files')})"
        if kind == "open_clip":
            return f"open_clip {value['name']} / {value['tag']}"
        if kind == "zoo":
            return f"vlzoo artefact zoo:{value}"
        return str(value)


def repo_root() -> Path:
    """The directory holding ``zoo_configs/`` and the manifest (the source checkout)."""
    return Path(__file__).resolve().parents[3]


def manifest_path() -> Path:
    """``$VLZOO_MANIFEST`` when set, else the repository's manifest."""
    return Path(os.environ.get("VLZOO_MANIFEST") or repo_root() / MANIFEST_NAME)


def _fail(where: str, message: str) -> None:
    raise ManifestError(f"{where}: {message}")


def _check_source(where: str, source: Any) -> None:
    if not isinstance(source, dict) or len(source) != 1 or next(iter(source)) not in SOURCE_KINDS:
        _fail(where, f"expected exactly one of {SOURCE_KINDS}, got {source!r}")
    kind, value = next(iter(source.items()))
    if kind == "hf":
        if not isinstance(value, dict) or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(value.get("repo", ""))):
            _fail(f"{where}.hf.repo", f"expected 'org/name', got {value!r}")
        files = value.get("files")
        ok = isinstance(files, list) and files and all(
            isinstance(f, str) or (isinstance(f, list) and f and all(isinstance(a, str) for a in f)) for f in files)
        if not ok:
            _fail(f"{where}.hf.files", "expected a non-empty list of file names (or of lists of alternatives), "
                                       f"got {files!r}")
    elif kind == "url":
        if not isinstance(value, str) or not re.match(r"(https?|file)://", value):
            _fail(f"{where}.url", f"expected an http(s) or file URL, got {value!r}")
    elif kind == "open_clip":
        if not isinstance(value, dict) or not value.get("name") or not value.get("tag"):
            _fail(f"{where}.open_clip", f"expected {{name, tag}}, got {value!r}")
    elif not isinstance(value, str) or "/" not in value:
        _fail(f"{where}.zoo", f"expected FAMILY/VARIANT, got {value!r}")


def _check_preprocess(where: str, pre: Any) -> None:
    if not isinstance(pre, dict):
        _fail(where, f"expected a mapping, got {pre!r}")
    if not isinstance(pre.get("image_size"), int) or pre["image_size"] <= 0:
        _fail(f"{where}.image_size", f"expected a positive integer, got {pre.get('image_size')!r}")
    for key in ("mean", "std"):
        value = pre.get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
            _fail(f"{where}.{key}", f"expected three numbers, got {value!r}")
    if pre.get("interpolation") not in INTERPOLATIONS:
        _fail(f"{where}.interpolation", f"expected one of {INTERPOLATIONS}, got {pre.get('interpolation')!r}")
    if pre.get("resize_mode", "shortest") not in RESIZE_MODES:
        _fail(f"{where}.resize_mode", f"expected one of {RESIZE_MODES}, got {pre.get('resize_mode')!r}")


def _check_metric(where: str, metric: Any, root: Path | None) -> None:
    if not isinstance(metric, dict):
        _fail(where, f"expected a mapping, got {metric!r}")
    for key in ("task", "dataset", "name"):
        if not isinstance(metric.get(key), str) or not metric[key]:
            _fail(f"{where}.{key}", f"expected a non-empty string, got {metric.get(key)!r}")
    if "measured" in metric:  # a vlzoo-trained model: the figure comes from its measured record
        _fill_measured(where, metric, root or repo_root())
    if not isinstance(metric.get("value"), (int, float)):
        _fail(f"{where}.value", f"expected a number, got {metric.get('value')!r}")
    if "benchmark" in metric:  # the figure vlzoo eval --benchmark reproduces, and its key in the report
        _check_benchmark(where, metric)


def _check_benchmark(where: str, metric: dict[str, Any]) -> None:
    keys = BENCHMARK_KEYS.get(metric["benchmark"])
    if keys is None:
        _fail(f"{where}.benchmark", f"expected one of {sorted(BENCHMARK_KEYS)}, got {metric['benchmark']!r}")
    if metric.get("key") not in keys:
        _fail(f"{where}.key", f"expected a metric of {metric['benchmark']} ({', '.join(keys)}), "
                              f"got {metric.get('key')!r}")


def read_measured(path: Path) -> dict[str, Any]:
    """A measured record (``docs/measured/NAME.json``): what was run (config, command,
    steps, batch size, parameters) and the run's metrics."""
    import json

    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path}: not a readable measured record ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise ManifestError(f"{path}: expected a JSON object with a 'metrics' mapping")
    return record


def _fill_measured(where: str, metric: dict[str, Any], root: Path) -> None:
    if "value" in metric:
        _fail(f"{where}.value", "give either value or measured (the value is read from the measured record)")
    path = root / str(metric["measured"])
    if not path.is_file():
        _fail(f"{where}.measured", f"{path} does not exist")
    record = read_measured(path)
    key = metric.get("key")
    if key not in record["metrics"]:
        _fail(f"{where}.key", f"expected one of {sorted(record['metrics'])} (the metrics of {path}), got {key!r}")
    metric["value"] = record["metrics"][key]
    metric["record"] = record


def fetched_files(source: dict) -> set[str]:
    """The file names a (valid) source downloads: hf ``files`` (alternatives flattened)
    and ``optional``; a URL's file name; open_clip's hub files (or its URL's with
    ``prefer: url``, not known without open_clip)."""
    kind, value = next(iter(source.items()))
    if kind == "hf":
        names = [n for f in value["files"] + list(value.get("optional", [])) for n in (f if isinstance(f, list) else [f])]
        return set(names)
    if kind == "url":
        return {value.rsplit("/", 1)[-1].split("?")[0]}
    if kind == "open_clip":
        return set(OPEN_CLIP_FILES) if value.get("prefer", "hf") == "hf" else set()
    return set()


def validate_entry(raw: Any, index: int, root: Path | None = None) -> ManifestEntry:
    """A :class:`ManifestEntry` from a raw mapping, or a :class:`ManifestError` that
    names the entry (by name, else by position) and the offending field."""
    where = f"{MANIFEST_NAME} entry {index}"
    if not isinstance(raw, dict):
        _fail(where, f"expected a mapping, got {type(raw).__name__}")
    if isinstance(raw.get("name"), str):
        where = f"{MANIFEST_NAME} entry {raw['name']!r}"
    missing = [k for k in REQUIRED if k not in raw]
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        _fail(where, f"missing fields {missing}, unknown fields {unknown}")
    name = raw["name"]
    prefixes = name_prefixes()
    if not isinstance(name, str) or not name.startswith(prefixes) or not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name):
        _fail(f"{where}.name", f"expected lower-case, starting with one of {prefixes}, got {name!r}")
    if raw["family"] not in families.names():
        _fail(f"{where}.family", f"expected one of {families.names()}, got {raw['family']!r}")
    if raw["format"] not in formats():
        _fail(f"{where}.format", f"expected one of {formats()}, got {raw['format']!r}")
    config = raw["config"]
    if not isinstance(config, str) or not config.endswith(".yaml"):
        _fail(f"{where}.config", f"expected a zoo config path ending in .yaml, got {config!r}")
    if root is not None and not (root / config).is_file():
        _fail(f"{where}.config", f"{config} does not exist under {root}")
    _check_source(f"{where}.source", raw["source"])
    if raw["format"] == "open_clip" and "open_clip" not in raw["source"]:
        _fail(f"{where}.source", "format open_clip needs an open_clip: {name, tag} source (it names the architecture)")
    _check_preprocess(f"{where}.preprocess", raw["preprocess"])
    _check_metric(f"{where}.metric", raw["metric"], root)
    for key in ("tokenizer", "license", "paper"):
        if not isinstance(raw[key], str) or not raw[key]:
            _fail(f"{where}.{key}", f"expected a non-empty string, got {raw[key]!r}")
    if not raw["paper"].startswith("https://"):
        _fail(f"{where}.paper", f"expected an https URL, got {raw['paper']!r}")
    sha = raw.get("sha256")
    if sha is not None and not (isinstance(sha, dict) and all(isinstance(v, str) and _SHA256.fullmatch(v)
                                                              for v in sha.values())):
        _fail(f"{where}.sha256", f"expected a mapping file -> 64 lower-case hex digits, got {sha!r}")
    unfetched = sorted(set(sha or {}) - fetched_files(raw["source"]))
    if unfetched:
        _fail(f"{where}.sha256", f"{unfetched} are not files this source fetches (a digest there would never be "
                                 f"checked); it fetches {sorted(fetched_files(raw['source']))}")
    return ManifestEntry(**raw)


def parse_manifest(data: Any, root: Path | None = None) -> dict[str, ManifestEntry]:
    """Validated entries by name from the YAML's top-level mapping ``{checkpoints: [...]}``."""
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
        raise ManifestError(f"{MANIFEST_NAME}: expected a top-level 'checkpoints:' list")
    entries: dict[str, ManifestEntry] = {}
    for i, raw in enumerate(data["checkpoints"]):
        entry = validate_entry(raw, i, root)
        if entry.name in entries:
            raise ManifestError(f"{MANIFEST_NAME}: the name {entry.name!r} appears twice")
        entries[entry.name] = entry
    return entries


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, ManifestEntry]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoints manifest not found at {file} (set VLZOO_MANIFEST to its path)")
    return parse_manifest(yaml.safe_load(file.read_text()), file.parent)


def load_manifest() -> dict[str, ManifestEntry]:
    """Every entry of the manifest, by name."""
    return _load(str(manifest_path()))


def config_path(entry: ManifestEntry) -> Path:
    """The entry's zoo config file (paths are relative to the manifest's directory)."""
    return manifest_path().parent / entry.config


def get_entry(name: str) -> ManifestEntry:
    """The entry called ``name``; an unknown name is an error listing close names."""
    entries = load_manifest()
    if name not in entries:
        import difflib

        close = difflib.get_close_matches(name, entries, n=5, cutoff=0.4)
        raise KeyError(f"no checkpoint named {name!r} in {manifest_path()}; close: {close or sorted(entries)[:10]}")
    return entries[name]


def list_models(filter: str | None = None) -> list[str]:  # noqa: A002 - the documented name
    """Names in the checkpoints manifest, sorted; ``filter``: a substring or a
    shell-style pattern (``blip-*``). Imports neither torch nor Lightning."""
    names = sorted(load_manifest())
    if not filter:
        return names
    pattern = (filter if any(c in filter for c in "*?[") else f"*{filter}*").lower()
    return [n for n in names if fnmatch.fnmatch(n.lower(), pattern)]
