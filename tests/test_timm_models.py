"""``timm:<name>.<tag>`` (issue 18): timm's own pretrained_cfg for the weights and the eval preprocessing, checked
against timm itself (``timm.create_model(name, pretrained=False)`` + ``load_state_dict`` + timm's
``create_transform(**resolve_data_config(...))``), and the ``.dino`` tag against the ``dino_vits16`` card on the
same file in DINO's official backbone format (``dino_deitsmall16_pretrain.pth``: timm key names, no head)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from prosmin_bench import get_model
from prosmin_bench.cli import main
from prosmin_bench.errors import WeightsError
from prosmin_bench.models.weights import sha256_file
from prosmin_bench.paths import record_path
from prosmin_bench.results import ResultRecord, read_record

NAME = "vit_small_patch16_224.dino"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random ViT-S/16 state dict (every tensor redrawn, so no default init matches) saved as DINO's file."""
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in
             timm.create_model(NAME, pretrained=False).state_dict().items()}
    path = tmp_path_factory.mktemp("w") / "dino_deitsmall16_pretrain.pth"
    torch.save(state, path)
    return path, state


def images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (260 + 20 * i, 300, 3), dtype=np.uint8)) for i in range(n)]


def test_tagged_timm_model_with_weights_equals_timm_through_its_own_transform(weights):
    path, state = weights
    ours = get_model(f"timm:{NAME}", weights=path)
    ref = timm.create_model(NAME, pretrained=False)
    ref.load_state_dict(state, strict=True)
    ref.eval()
    tf = create_transform(**resolve_data_config({}, model=ref))
    imgs = images()
    x_ref = torch.stack([tf(im) for im in imgs])
    x_ours = torch.stack([ours.transform(im) for im in imgs])
    assert torch.equal(x_ours, x_ref)  # timm's eval preprocessing, Resize(248) for crop_pct 0.9, not DINO's 256
    with torch.no_grad():
        torch.testing.assert_close(ours(x_ours), ref(x_ref), rtol=0, atol=1e-5)
    assert ours.weights_sha256 == sha256_file(path)
    assert ours.spec.preprocess.resize == 248 and ours.record_info["preprocess"].startswith("resize=248,crop=224,")


def test_dino_tag_equals_the_dino_vits16_card_on_the_same_file(weights):
    path, _ = weights
    tagged, card = get_model(f"timm:{NAME}", weights=path), get_model("dino_vits16", weights=path)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(tagged(x), card(x))
        assert torch.equal(tagged.features(x, "cls_last4"), card.features(x, "cls_last4"))
    assert tagged.weights_sha256 == card.weights_sha256


def test_offline_without_the_file_says_which_file_to_put_where(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as info:
        get_model(f"timm:{NAME}")
    text = str(info.value)
    assert "\n" not in text and "--weights FILE" in text
    assert f"model.safetensors of Hugging Face repo timm/{NAME} in {tmp_path / 'hf'}" in text
    assert str(tmp_path / "hub" / "checkpoints" / "dino_deitsmall16_pretrain.pth") in text


def test_the_hf_cache_file_is_used_when_present(tmp_path, monkeypatch, weights):
    from safetensors.torch import save_file

    _, state = weights
    snap = tmp_path / "hf" / f"models--timm--{NAME}" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    save_file(state, str(snap / "model.safetensors"))
    (tmp_path / "hf" / f"models--timm--{NAME}" / "refs").mkdir()
    (tmp_path / "hf" / f"models--timm--{NAME}" / "refs" / "main").write_text("abc")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    model = get_model(f"timm:{NAME}")
    assert model.weights_path == str(snap / "model.safetensors")
    assert model.weights_sha256 == sha256_file(snap / "model.safetensors")
    assert torch.equal(model.net.pos_embed, state["pos_embed"])


def test_cli_timm_tag_with_weights_records_timms_preprocessing(weights, tmp_path, capsys):
    path, _ = weights
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "tiny_knn.toml").write_text(textwrap.dedent("""
        name = "tiny_knn"
        kind = "knn"
        version = 1
        suite = "imagenet"
        main_score = "top1_k1"
        [datasets]
        train = { source = "imagefolder", root = "train" }
        test = { source = "imagefolder", root = "test" }
        [protocol]
        ks = [1]
    """))
    code = main(["-q", "--cards", str(tmp_path / "cards"), "run", "--model", f"timm:{NAME}", "--weights", str(path),
                 "--task", "tiny_knn", "--data-root", str(tmp_path / "data"), "--results", str(tmp_path / "res"),
                 "--device", "cpu", "--num-workers", "0"])
    assert code == 0, capsys.readouterr().err
    rec = read_record(record_path(tmp_path / "res", f"timm:{NAME}", "tiny_knn"))
    assert isinstance(rec, ResultRecord)
    assert rec.weights_sha256 == sha256_file(path) and rec.model_info["arch"] == f"timm:{NAME}"
    assert rec.model_info["preprocess"] == ("resize=248,crop=224,interp=bicubic,mean=(0.485, 0.456, 0.406),"
                                            "std=(0.229, 0.224, 0.225)")


def test_hf_hub_name_loads_config_and_weights_from_the_hf_cache(tmp_path, monkeypatch, weights):
    """``timm:hf-hub:<org>/<repo>``: timm's config.json and model.safetensors from the Hugging Face cache (offline);
    the same features as the tagged name on the same weights, and a safe results folder."""
    import json

    import huggingface_hub.constants
    from safetensors.torch import save_file

    path, state = weights
    repo = tmp_path / "hf" / "models--me--my_vit"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cfg = timm.models.get_pretrained_cfg(NAME).to_dict()
    config = {"architecture": "vit_small_patch16_224", "num_classes": 0,
              "pretrained_cfg": {k: cfg[k] for k in ("tag", "input_size", "interpolation", "crop_pct", "crop_mode",
                                                      "mean", "std", "num_classes", "first_conv", "classifier")}}
    (snap / "config.json").write_text(json.dumps(config))
    save_file(state, str(snap / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    hub = get_model("timm:hf-hub:me/my_vit")
    tagged = get_model(f"timm:{NAME}", weights=path)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(hub(x), tagged(x))
    assert hub.spec.preprocess == tagged.spec.preprocess
    assert hub.weights_sha256 == sha256_file(snap / "model.safetensors")
    folder = record_path(tmp_path / "r", "timm:hf-hub:me/my_vit", "t").parent
    assert folder == tmp_path / "r" / "timm--hf-hub--me--my_vit"
