import os
import signal

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test caches into a private VLZOO_HOME shared by the session."""
    home = tmp_path_factory.getbasetemp() / "vlzoo_home"
    monkeypatch.setenv("VLZOO_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


def pytest_configure(config):
    """A suite started in the background by a shell without job control inherits SIGINT
    ignored, and so would the runs it starts, which then could not be stopped by the Ctrl-C
    the fault tests send: Python's own handler makes the children start with the default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
