"""Baseline model cards, checkpoint converters and weights resolution (issue 4, items 1-3).

The fake official checkpoints below are written from the official repositories' key layouts, spelled out here
independently of the converters: DINO ``main_dino.py`` ``save_dict`` and ``vision_transformer.DINOHead``; iBOT
``main_ibot.py``, ``models/head.iBOTHead`` and ``extract_backbone_weights.py``; MoCo-v3 ``main_moco.py``,
``moco/builder.MoCo_ViT`` (``_build_mlp``) and ``main_lincls.py``. Every loaded backbone is compared tensor by
tensor with the tensors the fake checkpoint was made from.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
from pathlib import Path

import pytest
import torch

from prosmin_bench.errors import WeightsError
from prosmin_bench.models import ModelSpec, WeightsSource, build_architecture, get_model, get_model_spec
from prosmin_bench.models.converters import CONVERTERS, convert, detect_format
from prosmin_bench.models.spec import MINI_PREPROCESS
from prosmin_bench.models.weights import load_checkpoint_file, resolve_weights_path

BASELINES = Path(__file__).resolve().parents[1] / "baselines"

# Official ViT-S/16 (DINO/iBOT ``vit_small``, MoCo-v3 ``vits.vit_small``): width 384, 12 blocks, patch 16 at 224 px.
VITS16 = dict(dim=384, depth=12, patch=16, img=224)
# The suite's vit_micro has the same key structure at width 96, 4 blocks, patch 4 at 32 px.
MICRO = dict(dim=96, depth=4, patch=4, img=32)


@pytest.fixture(autouse=True)
def _baselines_env(tmp_path, monkeypatch):
    """Every test gets its own cache (``PROSMIN_BENCH_HOME``) and no network unless it says otherwise."""
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("PROSMIN_BENCH_OFFLINE", "1")
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------ official layouts
def vit_layout(dim: int, depth: int, patch: int, img: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of DINO's / iBOT's / MoCo-v3's (timm-named) ViT backbone without classifier."""
    tokens = (img // patch) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim), "pos_embed": (1, tokens, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
            b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,),
        })
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def rand(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s) for k, s in shapes.items()}


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def dino_head(dim: int, out: int, hidden: int = 32, bottleneck: int = 16, last2: bool = False) -> dict:
    """DINOHead (3 Linear + GELU, weight-normed last layer); iBOTHead adds ``last_layer2``."""
    s = {
        "mlp.0.weight": (hidden, dim), "mlp.0.bias": (hidden,), "mlp.2.weight": (hidden, hidden),
        "mlp.2.bias": (hidden,), "mlp.4.weight": (bottleneck, hidden), "mlp.4.bias": (bottleneck,),
        "last_layer.weight_g": (out, 1), "last_layer.weight_v": (out, bottleneck),
    }
    if last2:
        s.update({"last_layer2.weight_g": (out, 1), "last_layer2.weight_v": (out, bottleneck)})
    return rand(s)


def bn(prefix: str, n: int, affine: bool = True) -> dict[str, torch.Tensor]:
    out = {prefix + "running_mean": torch.randn(n), prefix + "running_var": torch.rand(n) + 0.5,
           prefix + "num_batches_tracked": torch.tensor(1000)}
    if affine:
        out.update({prefix + "weight": torch.randn(n), prefix + "bias": torch.randn(n)})
    return out


def mocov3_mlps(dim: int, mlp: int = 32, out: int = 16) -> tuple[dict, dict]:
    """MoCo_ViT projector ``head`` (_build_mlp(3, dim, mlp, out)) and ``predictor`` (_build_mlp(2, out, mlp, out)):
    Linear(bias=False), BN, ReLU, ..., Linear(bias=False), BN(affine=False)."""
    head = {"0.weight": torch.randn(mlp, dim), **bn("1.", mlp), "3.weight": torch.randn(mlp, mlp), **bn("4.", mlp),
            "6.weight": torch.randn(out, mlp), **bn("7.", out, affine=False)}
    pred = {"0.weight": torch.randn(mlp, out), **bn("1.", mlp), "3.weight": torch.randn(out, mlp),
            **bn("4.", out, affine=False)}
    return head, pred


def dino_full(size: dict, out: int = 64) -> tuple[dict, dict]:
    """DINO main_dino.py ``save_dict``; returns (checkpoint, teacher backbone tensors)."""
    layout = vit_layout(**size)
    teacher_bb, student_bb = rand(layout), rand(layout)
    ckpt = {
        "student": {**prefixed("module.backbone.", student_bb),
                    **prefixed("module.head.", dino_head(size["dim"], out))},
        "teacher": {**prefixed("backbone.", teacher_bb), **prefixed("head.", dino_head(size["dim"], out))},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "weight_decay": 0.4, "params": [0, 1]}]},
        "epoch": 800,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=out, teacher_temp=0.04),
        "dino_loss": {"center": torch.randn(1, out)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                        "_growth_tracker": 10},
    }
    return ckpt, teacher_bb


def ibot_full(size: dict, out: int = 64, teacher_mask_token: bool = False) -> tuple[dict, dict]:
    """iBOT main_ibot.py ``save_dict``: the student backbone has ``masked_embed`` [1, D]; the teacher (built
    without masked image modelling) has none unless asked; both heads carry ``last_layer2``."""
    layout = vit_layout(**size)
    teacher_bb, student_bb = rand(layout), rand(layout)
    student_bb_full = {**student_bb, "masked_embed": torch.randn(1, size["dim"])}
    teacher_bb_full = {**teacher_bb, **({"masked_embed": torch.randn(1, size["dim"])} if teacher_mask_token else {})}
    ckpt = {
        "student": {**prefixed("module.backbone.", student_bb_full),
                    **prefixed("module.head.", dino_head(size["dim"], out, last2=True))},
        "teacher": {**prefixed("backbone.", teacher_bb_full),
                    **prefixed("head.", dino_head(size["dim"], out, last2=True))},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 800,
        "args": argparse.Namespace(arch="vit_small", pred_ratio=[0.0, 0.3], shared_head=True),
        "ibot_loss": {"center": torch.randn(1, out), "center2": torch.randn(1, 1, out)},
    }
    return ckpt, teacher_bb


def ibot_teacher(size: dict, with_head: bool = True, mask_token: bool = False) -> tuple[dict, dict]:
    """iBOT extract_backbone_weights.py output: ``{'state_dict': ViT keys [+ head.* with --with_head]}``."""
    bb = rand(vit_layout(**size))
    inner = dict(bb)
    if with_head:
        inner.update(prefixed("head.", dino_head(size["dim"], 64, last2=True)))
    if mask_token:
        inner["masked_embed"] = torch.randn(1, size["dim"])
    return {"state_dict": inner}, bb


def mocov3(size: dict) -> tuple[dict, dict]:
    """MoCo-v3 main_moco.py checkpoint of the DDP-wrapped MoCo_ViT."""
    layout = vit_layout(**size)
    base, momentum = rand(layout), rand(layout)
    head_b, pred = mocov3_mlps(size["dim"])
    head_m, _ = mocov3_mlps(size["dim"])
    state = {
        **prefixed("module.base_encoder.", base), **prefixed("module.base_encoder.head.", head_b),
        **prefixed("module.momentum_encoder.", momentum), **prefixed("module.momentum_encoder.head.", head_m),
        **prefixed("module.predictor.", pred),
    }
    ckpt = {"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 0}}
    return ckpt, base


def micro_spec(name: str = "card_micro", method: str = "", **weights) -> ModelSpec:
    """A URL-style card for vit_micro (fast stand-in for a ViT-S/16 card: same key structure)."""
    src = WeightsSource(**{"url": "https://example.invalid/weights/micro.pth", **weights})
    return ModelSpec(name=name, arch="vit_micro", weights=src, preprocess=MINI_PREPROCESS, scale="mini", method=method)


def save(tmp_path: Path, obj, name: str) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_backbone_equals(model, source: dict[str, torch.Tensor]) -> None:
    own = model.net.state_dict()
    assert set(own) == set(source)
    for k, v in source.items():
        assert torch.equal(own[k], v), k


# ----------------------------------------------------------------------------------------------- the cards
def test_shipped_cards_describe_the_official_checkpoints():
    got = {n: get_model_spec(n) for n in ("dino_vits16", "ibot_vits16", "mocov3_vits16", "prosmin_vits16")}
    dino, ibot, moco, prosmin = got.values()
    assert dino.weights.url == (
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
    )
    assert ibot.weights.url == (
        "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vits_16/checkpoint_teacher.pth"
    )
    assert moco.weights.url == "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar"
    assert (dino.weights.format, ibot.weights.format, moco.weights.format) == ("plain", "ibot_teacher", "mocov3")
    for spec in (dino, ibot, moco):
        assert spec.arch == "vit_small_patch16" and spec.scale == "imagenet" and spec.converter == "auto"
        assert spec.weights.sha256 is None  # never pinned without the real file
        assert (spec.preprocess.resize, spec.preprocess.crop) == (256, 224)
        assert spec.licence and spec.paper
    assert moco.arch_kwargs == {"num_heads": 12}
    assert dino.arch_kwargs == {} and ibot.arch_kwargs == {}
    assert "CC-BY-NC" in moco.licence and "Apache" in dino.licence and "Apache" in ibot.licence
    assert prosmin.weights.recipe == "prosmin_vits16_in1k" and prosmin.weights.url is None
    # the paper numbers (docs/protocols.md "Paper-reported numbers"), as fractions, each with a citation
    assert {e["top1_k20"] for e in dino.reported["imagenet_knn"]} == {0.745}
    assert {e["top1_k20"] for e in ibot.reported["imagenet_knn"]} == {0.752}
    assert [e["top1_k20"] for e in prosmin.reported["imagenet_knn"]] == [0.762]
    assert {e["top1"] for e in moco.reported["imagenet_linear"]} == {0.732}
    table1 = next(e for e in prosmin.reported["imagenet_linear"] if "Table 1" in e["source"])
    assert (table1["top1"], table1["nll"], table1["ece"]) == (0.784, 0.900, 0.006)
    # the leaderboard's reader (prosmin_bench.reported) accepts every entry and keeps the fractions as they are
    from prosmin_bench.reported import reported_scores

    rows = reported_scores("imagenet", specs=list(got.values()))
    assert {r.origin for r in rows if r.model == "dino_vits16"} == {dino.card}
    assert any(r.model == "mocov3_vits16" and r.task == "imagenet_c" and r.value == 73.5 for r in rows)
    for spec in got.values():
        for task, entries in spec.reported.items():
            for e in entries:
                assert e["source"], (spec.name, task)
                for metric, v in e.items():
                    if metric.startswith(("top1", "auroc", "ece")):
                        assert 0.0 < v < 1.0, (spec.name, task, metric)


def test_mocov3_card_builds_twelve_heads_and_its_attention_differs_from_six(tmp_path):
    """Same weights, 12 vs 6 heads: shapes agree (so a wrong build would load strictly), outputs do not."""
    ckpt, base = mocov3(VITS16)
    path = save(tmp_path, ckpt, "vit-s-300ep.pth.tar")
    model = get_model("mocov3_vits16", weights=path)
    assert all(blk.attn.num_heads == 12 for blk in model.net.blocks)
    assert_backbone_equals(model, base)  # real ViT-S/16 key names
    six = build_architecture("vit_small_patch16").eval()
    assert six.blocks[0].attn.num_heads == 6
    six.load_state_dict(model.net.state_dict(), strict=True)
    x = torch.randn(2, 197, 384)
    with torch.no_grad():
        a12, a6 = model.net.blocks[0].attn(x), six.blocks[0].attn(x)
    assert a12.shape == a6.shape
    assert not torch.allclose(a12, a6, atol=1e-4)
    # and the 12-head forward is the textbook multi-head attention with 12 heads of 32 (independent reference)
    # (in float64: random N(0, 1) weights give large logits, where float32 kernels differ in the last bits)
    attn, x = copy.deepcopy(model.net.blocks[0].attn).double(), x.double()
    with torch.no_grad():
        out = attn(x)
        q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(2, 197, 3, 12, 32).permute(2, 0, 3, 1, 4)
        ref = torch.softmax(q @ k.transpose(-2, -1) / 32 ** 0.5, dim=-1) @ v
        ref = ref.transpose(1, 2).reshape(2, 197, 384) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------------------------------------- converters
@pytest.mark.parametrize("maker, fmt", [
    (lambda: dino_full(MICRO), "dino_full"),
    (lambda: ibot_full(MICRO), "ibot_full"),
    (lambda: ibot_full(MICRO, teacher_mask_token=True), "ibot_full"),
    (lambda: ibot_teacher(MICRO, with_head=True), "ibot_teacher"),
    (lambda: ibot_teacher(MICRO, with_head=False, mask_token=True), "ibot_teacher"),
    (lambda: mocov3(MICRO), "mocov3"),
], ids=["dino_full", "ibot_full", "ibot_full_teacher_mask", "ibot_teacher_head", "ibot_teacher_mask", "mocov3"])
def test_official_format_loads_exactly(tmp_path, maker, fmt):
    ckpt, source = maker()
    assert detect_format(ckpt) == fmt
    path = save(tmp_path, ckpt, "ckpt.pth")
    model = get_model(micro_spec(), weights=path)
    assert_backbone_equals(model, source)
    assert model.weights_sha256 == sha256_of(path)
    assert model.weights_path == str(path)


def test_dino_plain_backbone_file_loads_exactly_at_vits16(tmp_path):
    """dino_deitsmall16_pretrain.pth is the bare teacher backbone with DINO's (= timm's) ViT-S/16 names."""
    state = rand(vit_layout(**VITS16))
    assert len(state) == 4 + 12 * 12 + 2
    path = save(tmp_path, state, "dino_deitsmall16_pretrain.pth")
    model = get_model("dino_vits16", weights=path)
    assert_backbone_equals(model, state)
    assert model.embed_dim == 384 and model.net.blocks[0].attn.num_heads == 6


def test_dino_full_checkpoint_loads_the_teacher_at_vits16(tmp_path):
    ckpt, teacher = dino_full(VITS16)
    path = save(tmp_path, ckpt, "dino_deitsmall16_pretrain_full_checkpoint.pth")
    model = get_model("dino_vits16", weights=path)
    assert_backbone_equals(model, teacher)


def test_ibot_teacher_file_loads_at_vits16(tmp_path):
    ckpt, bb = ibot_teacher(VITS16, with_head=True)
    model = get_model("ibot_vits16", weights=save(tmp_path, ckpt, "checkpoint_teacher.pth"))
    assert_backbone_equals(model, bb)


@pytest.mark.parametrize("kind", ["missing", "extra"])
def test_missing_or_extra_key_fails_with_the_keys_listed(tmp_path, kind):
    ckpt, _ = dino_full(MICRO)
    if kind == "missing":
        del ckpt["teacher"]["backbone.blocks.1.attn.qkv.bias"]
        expect = ["missing keys", "blocks.1.attn.qkv.bias"]
    else:
        ckpt["teacher"]["backbone.blocks.0.attn.extra_scale"] = torch.ones(3)
        expect = ["unexpected keys", "blocks.0.attn.extra_scale"]
    with pytest.raises(WeightsError) as info:
        get_model(micro_spec(), weights=save(tmp_path, ckpt, "x.pth"))
    for text in expect:
        assert text in str(info.value)


def test_mocov3_without_projector_removal_would_be_unexpected_keys(tmp_path):
    """The projector and predictor never reach the backbone; a mis-prefixed MoCo file is not silently accepted."""
    ckpt, base = mocov3(MICRO)
    state, fmt = convert(ckpt)
    assert fmt == "mocov3" and set(state) == set(base)
    bad = {"state_dict": {"module." + k[len("module.base_encoder."):]: v
                          for k, v in ckpt["state_dict"].items() if k.startswith("module.base_encoder.")}}
    with pytest.raises(WeightsError, match=r"'state_dict' holds \['module\.blocks\.0\."):
        get_model(micro_spec(), weights=save(tmp_path, bad, "bad.pth"))


def test_unknown_format_names_keys_found_and_formats_known(tmp_path):
    path = save(tmp_path, {"model_ema": {"w": torch.zeros(1)}, "epoch": 3}, "odd.pth")
    with pytest.raises(WeightsError) as info:
        get_model(micro_spec(), weights=path)
    msg = str(info.value)
    assert "model_ema" in msg and "epoch" in msg
    for fmt in CONVERTERS.names():
        assert fmt in msg


def test_checkpoint_of_another_family_is_refused(tmp_path):
    ckpt, _ = dino_full(MICRO)
    with pytest.raises(WeightsError, match="dino checkpoint"):
        get_model(micro_spec(method="mocov3"), weights=save(tmp_path, ckpt, "dino.pth"))


def test_named_converter_on_the_wrong_file_says_what_it_expected():
    ckpt, _ = mocov3(MICRO)
    with pytest.raises(WeightsError, match="'teacher'"):
        convert(ckpt, "dino_full")


# -------------------------------------------------------------------------------------- weights resolution
def _micro_file(tmp_path: Path, name: str, seed: int) -> Path:
    torch.manual_seed(seed)
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rand(vit_layout(**MICRO)), path)
    return path


def _online(monkeypatch) -> None:
    """Allow downloads (the URLs used are local ``file://`` paths or a refused local port)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("PROSMIN_BENCH_OFFLINE", raising=False)


def test_resolution_order_weights_then_weights_dir_then_cache(tmp_path):
    from prosmin_bench import config

    spec = micro_spec(filename="micro.pth")
    cached = _micro_file(config.weights_cache_dir(), "micro.pth", 1)
    wdir = tmp_path / "wdir"
    in_dir = _micro_file(wdir, "micro.pth", 2)
    explicit = _micro_file(tmp_path, "explicit.pth", 3)
    assert resolve_weights_path(spec, explicit, wdir) == explicit
    assert resolve_weights_path(spec, None, wdir) == in_dir
    assert resolve_weights_path(spec, None, tmp_path / "empty") == cached
    assert resolve_weights_path(spec) == cached
    # the loaded model records the sha256 of the file actually used
    assert get_model(spec, weights_dir=wdir).weights_sha256 == sha256_of(in_dir)
    assert get_model(spec).weights_sha256 == sha256_of(cached)


def test_download_into_the_cache_when_the_network_allows(tmp_path, monkeypatch):
    from prosmin_bench import config

    _online(monkeypatch)
    remote = _micro_file(tmp_path / "server", "micro.pth", 4)
    digest = sha256_of(remote)
    spec = micro_spec(url=remote.as_uri(), sha256=digest)
    path = resolve_weights_path(spec)
    assert path == config.weights_cache_dir() / "micro.pth" and sha256_of(path) == digest
    assert not list(config.weights_cache_dir().glob("*.part")) and not list(config.weights_cache_dir().glob("*.tmp"))
    remote.unlink()  # the second resolution is a cache hit
    assert get_model(spec).weights_sha256 == digest


def test_download_with_wrong_pinned_sha256_keeps_nothing(tmp_path, monkeypatch):
    from prosmin_bench import config

    _online(monkeypatch)
    remote = _micro_file(tmp_path / "server", "micro.pth", 5)
    spec = micro_spec(url=remote.as_uri(), sha256="0" * 64)
    with pytest.raises(WeightsError, match="pins 0000"):
        resolve_weights_path(spec)
    assert not config.weights_cache_dir().exists() or not any(config.weights_cache_dir().iterdir())


@pytest.mark.parametrize("how", ["offline_env", "unreachable"])
def test_no_network_error_says_what_to_fetch_and_where(tmp_path, monkeypatch, how):
    from prosmin_bench import config

    if how == "offline_env":
        monkeypatch.setenv("PROSMIN_BENCH_OFFLINE", "1")
        url = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
    else:
        _online(monkeypatch)
        url = "http://127.0.0.1:9/weights/micro.pth"  # nothing listens on the discard port: refused at once
    spec = micro_spec(url=url)
    with pytest.raises(WeightsError) as info:
        get_model(spec)
    msg = str(info.value)
    assert f"Fetch {url} and put it at {config.weights_cache_dir() / Path(url).name}" in msg
    wdir = tmp_path / "wdir"
    with pytest.raises(WeightsError) as info:
        get_model(spec, weights_dir=wdir)
    assert f"put it at {wdir / Path(url).name}" in str(info.value)


def test_pinned_sha256_mismatch_is_an_error(tmp_path):
    from prosmin_bench import config

    cached = _micro_file(config.weights_cache_dir(), "micro.pth", 6)
    spec = micro_spec(filename="micro.pth", sha256="a" * 64)
    with pytest.raises(WeightsError) as info:
        get_model(spec)
    assert sha256_of(cached) in str(info.value) and "a" * 64 in str(info.value)
    # the right pin loads; an explicit --weights file is the user's choice and is not checked against the pin
    assert get_model(micro_spec(filename="micro.pth", sha256=sha256_of(cached))).weights_sha256 == sha256_of(cached)
    assert get_model(spec, weights=cached).weights_sha256 == sha256_of(cached)


def test_truncated_file_is_reported(tmp_path):
    ckpt, _ = dino_full(MICRO)
    path = save(tmp_path, ckpt, "full.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        get_model(micro_spec(), weights=path)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_checkpoint_file(empty)


class NotAllowed:  # a pickled object of this class must not be unpickled by a weights load
    pass


@pytest.mark.parametrize("content, match", [
    (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
    (b"\x89PNG\r\n\x1a\n" + bytes(200), "not a PyTorch checkpoint"),
])
def test_non_checkpoint_file_is_reported(tmp_path, content, match):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=match):
        get_model(micro_spec(), weights=path)


def test_checkpoint_with_unsafe_objects_or_no_dict(tmp_path):
    with pytest.raises(WeightsError, match="NotAllowed"):
        load_checkpoint_file(save(tmp_path, {"obj": NotAllowed(), "w": torch.zeros(1)}, "unsafe.pth"))
    with pytest.raises(WeightsError, match="holds a list"):
        get_model(micro_spec(), weights=save(tmp_path, [torch.zeros(1)], "list.pth"))


def test_suite_checkpoint_without_a_target_network_gives_the_online_backbone():
    from prosmin_bench.models.converters import PRETRAIN_FORMAT

    online = rand(vit_layout(**MICRO))
    ckpt = {"format": PRETRAIN_FORMAT, "method": "somemethod", "target": {},
            "online": {**prefixed("backbone.", online), "head.weight": torch.zeros(2, 2)}}
    state, fmt = convert(ckpt)
    assert fmt == "prosmin_bench" and set(state) == set(online)
    assert all(torch.equal(state[k], v) for k, v in online.items())
    target = rand(vit_layout(**MICRO))
    ckpt["target"] = prefixed("backbone.", target)
    state, _ = convert(ckpt)
    assert all(torch.equal(state[k], v) for k, v in target.items())
