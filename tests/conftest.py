"""Test set-up: offline, one thread, and an isolated cache per test session (never the user's ~/.cache)."""

from __future__ import annotations

import os

# Never wait on the network (set before anything imports datasets / huggingface_hub).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["PROSMIN_BENCH_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Each test gets a fresh PROSMIN_BENCH_HOME unless it sets its own; user card folders are cleared."""
    from prosmin_bench import cards

    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(home))
    monkeypatch.delenv("PROSMIN_BENCH_CARDS", raising=False)
    monkeypatch.delenv("PROSMIN_BENCH_DATA", raising=False)
    cards.clear_card_dirs()
    yield home
    cards.clear_card_dirs()


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory):
    """A cache shared by the tests of a session that want features reused across tests."""
    return tmp_path_factory.mktemp("shared_home")
