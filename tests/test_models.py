"""Models: the Backbone face, strict loading, weights errors, timm models."""

import numpy as np
import pytest
import torch

from prosmin_bench import get_model
from prosmin_bench.errors import UnknownNameError, WeightsError
from prosmin_bench.models import build_architecture
from prosmin_bench.models.weights import sha256_file


def test_vit_micro_is_a_few_hundred_thousand_parameters():
    net = build_architecture("vit_micro")
    n = sum(p.numel() for p in net.parameters())
    assert 300_000 < n < 600_000


def test_random_sincos_micro_is_random_micro_with_mocov3_init_and_fixed_positions():
    """random_micro's architecture with MoCo-v3's vits.py init (its statistics: tests/test_pretrain_fidelity.py):
    the norms as random_micro's, the linears and the patch projection redrawn, and the position embedding vits.py's
    2-D sin-cos table written out directly here: [CLS] row zero, then per patch (row i, column j) [sin(i w),
    cos(i w), sin(j w), cos(j w)]."""
    a, b = get_model("random_micro").net.state_dict(), get_model("random_sincos_micro").net.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a if "norm" in k)
    assert not any(torch.equal(a[k], b[k]) for k in a if k.endswith(("qkv.weight", "fc1.weight", "proj.weight")))
    dim, quarter = 96, 24
    omega = [1.0 / 10000 ** (d / quarter) for d in range(quarter)]
    ref = torch.zeros(1, 65, dim)
    for i in range(8):
        for j in range(8):
            row = [np.sin(i * w) for w in omega] + [np.cos(i * w) for w in omega]
            row += [np.sin(j * w) for w in omega] + [np.cos(j * w) for w in omega]
            ref[0, 1 + 8 * i + j] = torch.tensor(row)
    torch.testing.assert_close(b["pos_embed"], ref)
    assert get_model("random_sincos_micro").weights_sha256 != get_model("random_micro").weights_sha256


def test_random_micro_is_one_fixed_model_with_the_backbone_face():
    a, b = get_model("random_micro"), get_model("random_micro")
    assert a.weights_sha256 == b.weights_sha256 and len(a.weights_sha256) == 64
    x = torch.randn(3, 3, 32, 32)
    fa = a(x)
    assert fa.shape == (3, 96) and a.embed_dim == 96 and not a.training
    assert torch.equal(fa, b(x))
    # final-norm CLS == timm's forward_features()[:, 0]
    assert torch.allclose(fa, a.net.forward_features(x)[:, 0])
    # last-4 concatenation: the last chunk is the final-norm CLS; earlier chunks are earlier blocks through the norm
    f4 = a.features(x, "cls_last4")
    assert f4.shape == (3, 384) and torch.allclose(f4[:, -96:], fa, atol=1e-6)
    net = a.net
    h = net.norm_pre(net._pos_embed(net.patch_embed(x)))
    h = net.blocks[0](h)
    assert torch.allclose(f4[:, :96], net.norm(h)[:, 0], atol=1e-6)
    with pytest.raises(Exception, match="Expected feature layer"):
        a.features(x, "cls_last0")


def test_loaded_weights_equal_the_file_and_record_its_sha(tmp_path):
    net = build_architecture("vit_micro")
    torch.manual_seed(5)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "w.pth"
    torch.save(net.state_dict(), path)
    model = get_model("random_micro", weights=path)
    for k, v in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v), k
    assert model.weights_sha256 == sha256_file(path)


def test_mismatched_keys_are_listed(tmp_path):
    state = build_architecture("vit_micro").state_dict()
    state.pop("blocks.3.mlp.fc2.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        get_model("random_micro", weights=tmp_path / "bad.pth")
    msg = str(err.value)
    assert "missing keys [blocks.3.mlp.fc2.bias]" in msg and "unexpected keys [extra.weight]" in msg


def test_wrong_shapes_are_listed(tmp_path):
    state = build_architecture("vit_micro", embed_dim=48, num_heads=3).state_dict()
    torch.save(state, tmp_path / "small.pth")
    with pytest.raises(WeightsError, match=r"shape mismatches \[blocks.0.attn.proj.bias: checkpoint \(48,\) vs model \(96,\)"):
        get_model("random_micro", weights=tmp_path / "small.pth")


def test_truncated_and_non_checkpoint_files(tmp_path):
    torch.save(build_architecture("vit_micro").state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="truncated or not a PyTorch checkpoint"):
        get_model("random_micro", weights=tmp_path / "trunc.pth")
    (tmp_path / "notes.txt").write_text("hello, not weights")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        get_model("random_micro", weights=tmp_path / "notes.txt")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="is empty"):
        get_model("random_micro", weights=tmp_path / "empty.pth")
    torch.save({"foo": {"bar": torch.zeros(2)}}, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match=r"Unknown checkpoint format: top-level keys \['foo'\]; known formats"):
        get_model("random_micro", weights=tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match="does not exist"):
        get_model("random_micro", weights=tmp_path / "nope.pth")


def test_recipe_model_without_checkpoint_says_how_to_make_it():
    with pytest.raises(WeightsError, match="prosmin-bench pretrain --recipe prosmin_micro"):
        get_model("prosmin_micro", shipped=False)  # none made here and the package's not allowed


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownNameError, match="did you mean 'random_micro'"):
        get_model("random_mikro")


def test_timm_models_are_reachable():
    model = get_model("timm:resnet18")
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 512) and model.spec.arch == "timm:resnet18"
    with pytest.raises(UnknownNameError):
        get_model("timm:not_a_real_model_x")
