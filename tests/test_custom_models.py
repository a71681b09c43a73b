"""Your own nn.Module without a card (issue 18): ``evaluate(module, ..., name=, transform=)`` and ``--model
module:<python.path>:<callable>``, checked against a DINO weighted-vote k-NN computed here on the module's own
features (DINO eval_knn.py ``knn_classifier``: cosine similarity, top k, weights exp(sim / T), T = 0.07)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms as T

import prosmin_bench
from prosmin_bench import cards, evaluate, get_model
from prosmin_bench.cli import main
from prosmin_bench.errors import ProsminBenchError
from prosmin_bench.paths import record_path
from prosmin_bench.results import ErrorRecord, ResultRecord, read_record

CLASSES = ("ant", "bee", "cat")
K = 5

CARD = """
    name = "user_knn"
    kind = "knn"
    version = 1
    suite = "mini"
    main_score = "top1_k5"
    [datasets]
    train = { source = "imagefolder", root = "toy/train" }
    test = { source = "imagefolder", root = "toy/test" }
    [protocol]
    ks = [5]
"""

LINEAR_CARD = """
    name = "user_linear4"
    kind = "linear"
    version = 1
    suite = "mini"
    main_score = "top1"
    [datasets]
    train = { source = "imagefolder", root = "toy/train" }
    test = { source = "imagefolder", root = "toy/test" }
    [protocol]
    layer = "cls_last4"
"""


class Tiny(nn.Module):
    """images [B, 3, 16, 16] -> features [B, 8]: a fixed random linear map of the pixels, then tanh."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(3 * 16 * 16, 8, generator=gen) / 16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(images.flatten(1) @ self.proj)


def tiny_transform() -> T.Compose:
    return T.Compose([T.Resize(16), T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def make_toy(root: Path) -> Path:
    """``root/toy/{train,test}/<class>/<i>.png``, 32 px RGB; each class has its own mean colour plus noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 5)):
        for c, cls in enumerate(CLASSES):
            d = root / "toy" / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.full((32, 32, 3), 60 + 60 * c, dtype=np.float64)
                img = np.clip(base + rng.normal(0, 70, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture
def toy(tmp_path):
    cdir = tmp_path / "cards"
    cdir.mkdir()
    (cdir / "user_knn.toml").write_text(textwrap.dedent(CARD))
    (cdir / "user_linear4.toml").write_text(textwrap.dedent(LINEAR_CARD))
    cards.add_card_dir(cdir)
    return cdir, make_toy(tmp_path / "data")


def direct_knn(module: nn.Module, transform, data: Path, k: int = K, temperature: float = 0.07):
    """(top-1, NLL) of DINO's weighted-vote k-NN on ``module``'s features, computed in numpy."""

    def feats(split: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for c, cls in enumerate(CLASSES):
            for p in sorted((data / "toy" / split / cls).iterdir()):
                xs.append(transform(Image.open(p).convert("RGB")))
                ys.append(c)
        with torch.no_grad():
            f = module(torch.stack(xs)).double().numpy()
        return f / np.linalg.norm(f, axis=1, keepdims=True), np.array(ys)

    (xtr, ytr), (xte, yte) = feats("train"), feats("test")
    sims = xte @ xtr.T
    top = np.argsort(-sims, axis=1)[:, :k]
    votes = np.zeros((len(xte), len(CLASSES)))
    for r in range(len(xte)):
        for j in top[r]:
            votes[r, ytr[j]] += np.exp(sims[r, j] / temperature)
    probs = votes / votes.sum(axis=1, keepdims=True)
    top1 = float(np.mean(probs.argmax(axis=1) == yte))
    nll = float(np.mean(-np.log(np.clip(probs[np.arange(len(yte)), yte], 1e-12, None))))
    return top1, nll


def test_an_nn_module_with_its_own_transform_gives_the_direct_dino_knn(toy, tmp_path):
    _, data = toy
    module, tf = Tiny(), tiny_transform()
    (rec,) = evaluate(module, "user_knn", name="tiny_user", transform=tf, data_root=data, device="cpu",
                      results_dir=tmp_path / "res")
    assert isinstance(rec, ResultRecord), rec
    top1, nll = direct_knn(module, tf, data)
    assert rec.per_seed["0"]["top1_k5"] == pytest.approx(top1, abs=1e-9)
    assert rec.per_seed["0"]["nll_k5"] == pytest.approx(nll, rel=1e-4)
    assert 0.0 < top1 < 1.0 or nll > 0  # a real k-NN, not a degenerate one
    assert rec.model == "tiny_user"
    assert rec.model_info["module"] == f"{__name__}.Tiny" and rec.model_info["arch"] == f"module:{__name__}.Tiny"
    assert rec.model_info["preprocess"] == f"custom:{tf!r}" and "Resize(size=16" in rec.model_info["preprocess"]
    assert read_record(record_path(tmp_path / "res", "tiny_user", "user_knn")).main_value == rec.main_value


def test_a_changed_module_is_not_served_the_old_record(toy, tmp_path):
    _, data = toy
    module, tf = Tiny(), tiny_transform()
    kw = dict(name="tiny_user", transform=tf, data_root=data, device="cpu", results_dir=tmp_path / "res")
    (first,) = evaluate(module, "user_knn", **kw)
    with torch.no_grad():
        module.proj.copy_(Tiny(seed=1).proj)
    (second,) = evaluate(module, "user_knn", **kw)
    assert second.weights_sha256 != first.weights_sha256  # a reused record would carry the old state dict's
    assert second.main_value == pytest.approx(direct_knn(module, tf, data)[0], abs=1e-9)


def test_the_default_preprocessing_is_the_mini_tasks_and_is_recorded(toy, tmp_path):
    _, data = toy

    class Flat(nn.Module):  # 32-px images as they are, mean/std 0.5
        def forward(self, x):
            return x.mean(dim=(2, 3))

    (rec,) = evaluate(Flat(), "user_knn", name="flat", data_root=data, device="cpu", results_dir=tmp_path / "res")
    mini = T.Compose([T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert rec.main_value == pytest.approx(direct_knn(Flat(), mini, data)[0], abs=1e-9)
    assert rec.model_info["preprocess"].startswith("resize=None,crop=32,")


@pytest.mark.parametrize("name, text", [
    (None, "Expected `name` for an nn.Module"),
    ("../up", "Expected `name` of letters, digits"),
    ("random_micro", "not a registered model's"),
])
def test_module_names_are_checked_like_card_names(toy, tmp_path, name, text):
    with pytest.raises(ProsminBenchError, match=text.replace("`", ".")) as info:
        evaluate(Tiny(), "user_knn", name=name, data_root=toy[1], device="cpu", results_dir=tmp_path / "res")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "res").exists()


def test_tasks_needing_more_than_final_features_say_what_the_module_must_provide(toy, tmp_path):
    (rec,) = evaluate(Tiny(), "user_linear4", name="tiny_user", transform=tiny_transform(), data_root=toy[1],
                      device="cpu", results_dir=tmp_path / "res")
    assert isinstance(rec, ErrorRecord)
    assert "get_intermediate_layers(images, n)" in rec.message and "'cls_last4'" in rec.message
    assert "\n" not in rec.message and rec.traceback == ""


def test_the_intermediate_layers_hook_gives_the_last_blocks_cls_tokens():
    class Blocks(nn.Module):  # DINO's hook: the last n blocks' outputs [B, T, D]
        def forward(self, x):
            return x.mean(dim=(2, 3))

        def get_intermediate_layers(self, x, n=1):
            tokens = x.flatten(2).transpose(1, 2)  # [B, H*W, 3]
            return [tokens * (i + 1) for i in range(6)][-n:]

    model = get_model(Blocks(), model_name="blocks", transform=tiny_transform())
    x = torch.randn(2, 3, 4, 4)
    got = model.features(x, "cls_last4")
    first = x.flatten(2)[:, :, 0]  # token 0 of every block: [B, 3]
    assert torch.equal(got, torch.cat([first * 3, first * 4, first * 5, first * 6], dim=-1))
    assert torch.equal(model(x), x.mean(dim=(2, 3)))


FACTORY = '''
import torch
from torchvision import transforms as T
from {test_module} import Tiny, tiny_transform


def build():
    return Tiny(), tiny_transform()


def bare():
    return Tiny()


def wrong():
    return 42
'''


def test_cli_module_factory_gives_the_api_number(toy, tmp_path, monkeypatch, capsys):
    cdir, data = toy
    pkg = tmp_path / "code"
    (pkg / "userpkg").mkdir(parents=True)
    (pkg / "userpkg" / "__init__.py").write_text("")
    (pkg / "userpkg" / "models.py").write_text(FACTORY.format(test_module=Tiny.__module__))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    code = main(["-q", "--cards", str(cdir), "run", "--model", "module:userpkg.models:build", "--task", "user_knn",
                 "--data-root", str(data), "--results", str(tmp_path / "cli"), "--device", "cpu",
                 "--num-workers", "0"])
    assert code == 0, capsys.readouterr().err
    cli_rec = read_record(record_path(tmp_path / "cli", "userpkg.models.build", "user_knn"))
    assert isinstance(cli_rec, ResultRecord) and cli_rec.model_info["module"] == f"{Tiny.__module__}.Tiny"
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(tmp_path / "other_home"))  # no cached features shared
    (api_rec,) = evaluate(Tiny(), "user_knn", name="api_tiny", transform=tiny_transform(), data_root=data,
                          device="cpu", results_dir=tmp_path / "api")
    assert cli_rec.per_seed == api_rec.per_seed
    assert cli_rec.main_value == pytest.approx(direct_knn(Tiny(), tiny_transform(), data)[0], abs=1e-9)
    code = main(["-q", "--cards", str(cdir), "run", "--model", "module:userpkg.models:wrong", "--task", "user_knn",
                 "--data-root", str(data), "--results", str(tmp_path / "cli2"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "expected the factory to return an nn.Module" in err, err
    (tmp_path / "w.pt").write_bytes(b"x")
    code = main(["-q", "--cards", str(cdir), "run", "--model", "module:userpkg.models:bare", "--task", "user_knn",
                 "--weights", str(tmp_path / "w.pt"), "--data-root", str(data), "--results", str(tmp_path / "cli3")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "a module's own code loads its weights" in err, err
    code = main(["-q", "run", "--model", "module:userpkg.nothere:build", "--task", "user_knn"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot import 'userpkg.nothere'" in err, err


def test_results_to_frame_is_tidy_and_matches_the_record_files(toy, tmp_path):
    import json

    (rec,) = results = evaluate(Tiny(), "user_knn", name="tiny_user", transform=tiny_transform(), data_root=toy[1],
                                seeds=(0, 1), device="cpu", results_dir=tmp_path / "res", quiet=True)
    assert isinstance(results, prosmin_bench.Results) and results.errors == []
    df = results.to_frame()
    assert list(df.columns) == ["model", "task", "task_version", "task_kind", "suite", "metric", "seed", "value",
                                "main_score", "weights_sha256"]
    on_disk = json.loads(record_path(tmp_path / "res", "tiny_user", "user_knn").read_text())  # not our reader
    want = {("tiny_user", "user_knn", int(s), m, v) for s, ms in on_disk["per_seed"].items() for m, v in ms.items()}
    assert set(zip(df.model, df.task, df.seed, df.metric, df.value)) == want and len(df) == len(want)
    assert set(df[df.main_score].metric) == {"top1_k5"} and set(df.seed) == {0, 1}
    assert not df.duplicated(["model", "task", "seed", "metric"]).any()


def test_evaluate_logs_and_shows_progress_without_a_logging_setup_and_not_with_quiet(toy, tmp_path, monkeypatch,
                                                                                    capsys):
    import logging

    # As in a fresh notebook: pytest installs root handlers, and an earlier CLI main() in this process its own.
    monkeypatch.setattr(logging.root, "handlers", [])
    ours = logging.getLogger("prosmin_bench")
    for attr, value in (("handlers", []), ("level", logging.NOTSET), ("propagate", True)):
        monkeypatch.setattr(ours, attr, value)
    kw = dict(name="tiny_user", transform=tiny_transform(), data_root=toy[1], device="cpu",
              results_dir=tmp_path / "res", overwrite=True)
    # stderr is not a terminal here: the tqdm.auto bars come as log lines, each update one (the real interval
    # between two lines, 30 s, is longer than this run; prosmin_bench/progress.py)
    monkeypatch.setattr(prosmin_bench.progress, "LOG_INTERVAL_S", 0.0)
    evaluate(Tiny(), "user_knn", **kw)
    err = capsys.readouterr().err
    assert "INFO prosmin_bench.runner: pair 1/1: tiny_user / user_knn: running" in err
    assert "INFO prosmin_bench.progress: tiny_user / user_knn: tiny_user root=toy/train,source=imagefolder:" in err
    assert "100% 1/1 batch [" in err  # the extraction bar's final state
    evaluate(Tiny(), "user_knn", quiet=True, **kw)
    assert capsys.readouterr().err == ""
    assert ours.handlers == [] and ours.level == logging.NOTSET  # nothing left behind
