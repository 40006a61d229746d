"""One source for every figure of a vlzoo-trained model: its measured record
(docs/measured/NAME.json). The manifest and `vlzoo list` read their figure from it, and
README.md and the zoo configs must agree with it on the figure, steps, batch size and
parameter count."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from vlzoo.hub.manifest import ManifestError, load_manifest, parse_manifest

ROOT = Path(__file__).resolve().parents[2]
RECORDS = sorted((ROOT / "docs/measured").glob("*.json"))
README = (ROOT / "README.md").read_text()


def test_every_vlzoo_trained_manifest_entry_reads_its_figure_from_a_record():
    entries = {n: e for n, e in load_manifest().items() if e.format == "vlzoo"}
    assert {p.stem for p in RECORDS} == set(entries)
    for name, entry in entries.items():
        record = json.loads((ROOT / entry.metric["measured"]).read_text())
        assert entry.metric["value"] == record["metrics"][entry.metric["key"]], name
        assert not re.search(r"\d\.\d{3}", entry.description), f"{name}: a figure in the description; use the record"


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.stem)
def test_config_and_readme_agree_with_the_record(path):
    record = json.loads(path.read_text())
    config = yaml.safe_load((ROOT / record["config"]).read_text())
    assert config["trainer"]["max_steps"] == record["steps"], f"{record['config']}: max_steps"
    assert config["data"]["batch_size"] == record["batch_size"], f"{record['config']}: data.batch_size"
    rows = [line for line in README.splitlines() if line.startswith(record["readme_row"])]
    assert len(rows) == 1, f"README.md has no single row starting {record['readme_row']!r}"
    entry = load_manifest()[record["name"]]
    figure = f"{record['metrics'][entry.metric['key']]:.3f}"
    assert figure in rows[0], f"README.md row {record['readme_row']!r} does not quote {figure}"


def test_readme_parameter_counts_match_the_records():
    clip = json.loads((ROOT / "docs/measured/clip-shapes-tiny.json").read_text())
    claimed = re.search(r"trains a tiny CLIP \(([\d.]+) M parameters\)", README)
    assert claimed and float(claimed.group(1)) == round(clip["params_total"] / 1e6, 2)
    albef = json.loads((ROOT / "docs/measured/albef-shapes-tiny.json").read_text())
    claimed = re.search(r"albef/shapes-tiny\.yaml +# ITC \+ ITM \+ MLM, ([\d.]+) M params", README)
    assert claimed and float(claimed.group(1)) == round(albef["params_total"] / 1e6, 1)


def test_vlzoo_list_shows_the_measured_figure(capsys):
    from vlzoo.cli import main

    assert main(["list", "albef-shapes"]) == 0
    record = json.loads((ROOT / "docs/measured/albef-shapes-tiny.json").read_text())
    assert f"R@1 t2i {record['metrics']['test/r1_t2i']}" in capsys.readouterr().out


def _entry(metric: dict) -> dict:
    return {"name": "clip-x", "family": "clip", "config": "zoo_configs/models/clip/shapes-tiny.yaml", "format": "vlzoo",
            "source": {"zoo": "clip/shapes-tiny"}, "preprocess": {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                                 "interpolation": "bicubic"},
            "tokenizer": "shapes", "license": "MIT", "paper": "https://example.org", "metric": metric}


def test_a_measured_metric_is_checked(tmp_path):
    record = tmp_path / "m.json"
    record.write_text(json.dumps({"metrics": {"test/r1_t2i": 0.25}}))
    base = {"task": "retrieval", "dataset": "shapes", "name": "R@1"}
    entries = parse_manifest({"checkpoints": [_entry({**base, "key": "test/r1_t2i", "measured": str(record)})]}, ROOT)
    assert entries["clip-x"].metric["value"] == 0.25
    with pytest.raises(ManifestError, match=r"metric.key: expected one of \['test/r1_t2i'\]"):
        parse_manifest({"checkpoints": [_entry({**base, "key": "test/r5", "measured": str(record)})]}, ROOT)
    with pytest.raises(ManifestError, match="give either value or measured"):
        parse_manifest({"checkpoints": [_entry({**base, "key": "test/r1_t2i", "measured": str(record), "value": 1})]},
                       ROOT)
