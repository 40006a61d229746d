"""Ranks and workers: each sees a distinct part of an epoch, together all of it; the
same run twice gives the same batches."""

import pytest
from data_writers import caption_rows, write_images, write_jsonl, write_shards

from vlzoo.data.datamodule import VLDataModule
from vlzoo.data.tokenizers import build_tokenizer

WORLD, WORKERS = 2, 2


def _datamodule(train: str, **kwargs) -> VLDataModule:
    dm = VLDataModule(train=train, val=train, test=train, num_workers=WORKERS, **kwargs)
    dm.attach(build_tokenizer("shapes", 16), 8, [0.5] * 3, [0.5] * 3)
    return dm


def _epochs(dm: VLDataModule, rank: int, epochs: int, key: str) -> list[list[list[int]]]:
    """Per epoch, the batches (lists of sample ids) rank ``rank`` reads."""
    dm.set_rank(rank, WORLD)
    loader = dm.train_dataloader()
    out = []
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)  # what Lightning does each epoch
        out.append([_ids(batch, key) for batch in loader])
    return out


def _ids(batch, key: str) -> list[int]:
    if key == "index":
        return batch["index"].tolist()
    return [int(c.split()[2]) for c in batch["captions"]]  # "picture number {i} in ..."


def _check_partition(per_rank: list[list[list[int]]], total: int) -> None:
    for epoch in range(len(per_rank[0])):
        parts = [{i for batch in rank[epoch] for i in batch} for rank in per_rank]
        counts = [sum(len(b) for b in rank[epoch]) for rank in per_rank]
        assert counts == [len(p) for p in parts], "a rank read a sample twice in one epoch"
        assert not parts[0] & parts[1], "ranks overlap"
        assert parts[0] | parts[1] == set(range(total)), "the epoch is not covered"
        assert len(per_rank[0][epoch]) == len(per_rank[1][epoch]), "ranks run different numbers of steps"


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    root = tmp_path_factory.mktemp("jsonl")
    return str(write_jsonl(root / "data.jsonl", caption_rows(write_images(root, 48))))


def test_map_source_two_ranks_two_workers(jsonl):
    dm = _datamodule(jsonl, batch_size=4)
    per_rank = [_epochs(dm, rank, 2, "index") for rank in range(WORLD)]
    _check_partition(per_rank, 48)
    assert per_rank[0][0] != per_rank[0][1], "no reshuffle between epochs"
    again = [_epochs(_datamodule(jsonl, batch_size=4), rank, 2, "index") for rank in range(WORLD)]
    assert again == per_rank, "the same run twice gave different batches"


@pytest.mark.parametrize("shards, per_shard", [(8, 6), (3, 8)])  # more shards than workers, and fewer
def test_webdataset_two_ranks_two_workers(tmp_path, shards, per_shard):
    write_shards(tmp_path / "s", count=shards * per_shard, per_shard=per_shard)
    spec = str(tmp_path / "s" / f"{{00000..{shards - 1:05d}}}.tar")
    dm = _datamodule(spec, batch_size=2, shuffle_buffer=5)
    per_rank = [_epochs(dm, rank, 2, "caption") for rank in range(WORLD)]
    _check_partition(per_rank, shards * per_shard)
    assert per_rank[0][0] != per_rank[0][1], "no reshuffle between epochs"
    again = [_epochs(_datamodule(spec, batch_size=2, shuffle_buffer=5), rank, 2, "caption") for rank in range(WORLD)]
    assert again == per_rank, "the same run twice gave different batches"


def test_resampled_shards_need_an_epoch_size_and_keep_it(tmp_path):
    write_shards(tmp_path / "s", count=12, per_shard=4)
    spec = str(tmp_path / "s" / "{00000..00002}.tar")
    with pytest.raises(ValueError, match="samples_per_epoch"):
        _datamodule(spec, resampled=True).source("train")
    dm = _datamodule(spec, batch_size=2, resampled=True, samples_per_epoch=40)
    batches = _epochs(dm, 0, 1, "caption")[0]
    assert len(batches) == 10 and all(len(b) == 2 for b in batches)  # 40 / 2 ranks / batch 2
