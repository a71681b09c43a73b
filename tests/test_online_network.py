"""Which network of a pretraining checkpoint is evaluated (issue 19, item 3).

ProSMin's paper (ICLR 2024, Sec. 6) freezes "the encoder of the online network": ``prosmin_micro`` is evaluated on
the online network, ``prosmin_target_micro`` (a variant, same checkpoint) on the target one; DINO and iBOT on their
teacher (target), MoCo-v3 on its base (online) encoder. The checkpoints here are built from the recipes' configs
with random weights, the online and target states made different everywhere, so every comparison can tell the two
networks apart; references are the checkpoint's own state dicts and heads rebuilt from the config alone.
"""

from __future__ import annotations

import json
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from prosmin_bench import cards
from prosmin_bench.errors import CardError, WeightsError
from prosmin_bench.models.converters import convert, strip_prefix

#: Narrow heads (the checkpoint's own config builds them); the backbone stays vit_micro, the registered models'.
HEADS = {
    "dino_micro": {"method.out_dim": 32, "method.head_hidden_dim": 64, "method.head_bottleneck_dim": 16},
    "ibot_micro": {"method.out_dim": 32, "method.patch_out_dim": 32, "method.head_hidden_dim": 64,
                   "method.head_bottleneck_dim": 16},
    "mocov3_micro": {"method.dim": 16, "method.mlp_dim": 32},
    "prosmin_micro": {"method.out_dim": 32, "method.head_hidden_dim": 64, "method.head_bottleneck_dim": 16,
                      "method.predictor_hidden_dim": 64},
}
#: What each registered model evaluates by default: ProSMin's paper (Sec. 6) and MoCo-v3's main_lincls.py the
#: online network, DINO's and iBOT's eval scripts the teacher (``--checkpoint_key teacher``).
DEFAULT_NETWORK = {"prosmin_micro": "online", "mocov3_micro": "online", "dino_micro": "target",
                   "ibot_micro": "target"}
OTHER = {"online": "target", "target": "online"}


def fake_checkpoint(recipe: str, seed: int = 0) -> dict:
    """A finished pretraining checkpoint of ``recipe`` in this suite's layout (``pretrain/train.py``
    ``_checkpoint_dict``), random weights, every parameter of the online and target states different."""
    import prosmin_bench.pretrain.recipes_baselines  # noqa: F401  (registers the baselines' recipes)
    from prosmin_bench.models.architectures import build_architecture
    from prosmin_bench.models.checkpoints import FORMAT, FORMAT_VERSION
    from prosmin_bench.models.networks import build_networks
    from prosmin_bench.pretrain import resolve_config

    cfg = resolve_config(recipe, overrides=HEADS[recipe]).to_dict()
    knobs = types.SimpleNamespace(**{**cfg["method_config"], "drop_path_rate": 0.0})
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    online, target = build_networks(cfg["method"], knobs,
                                    lambda dpr: build_architecture(cfg["arch"], **{**cfg["arch_kwargs"],
                                                                                   "drop_path_rate": dpr}))

    def noisy(net: nn.Module) -> dict:  # parameters only: buffers (BN running statistics) stay valid
        params = dict(net.named_parameters())
        return {k: v + torch.randn(v.shape, generator=gen) if k in params else v.clone()
                for k, v in net.state_dict().items()}

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "recipe": recipe, "method": cfg["method"],
            "arch": cfg["arch"], "arch_kwargs": cfg["arch_kwargs"], "config": cfg, "step": 1, "total_steps": 1,
            "finished": True, "online": noisy(online), "target": noisy(target), "method_state": {}}


def save(ckpt: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def backbone_state(ckpt: dict, network: str) -> dict:
    return strip_prefix(ckpt[network], "backbone.")


def assert_state_equal(module: nn.Module, expected: dict) -> None:
    got = module.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def reference_head(ckpt: dict, network: str, embed_dim: int) -> nn.Module:
    """A DINO head (ProSMin's projection head) built from the checkpoint's config alone, with ``network``'s state."""
    from prosmin_bench.models.heads import DINOHead

    c = ckpt["config"]["method_config"]
    head = DINOHead(embed_dim, c["out_dim"], hidden_dim=c["head_hidden_dim"],
                    bottleneck_dim=c["head_bottleneck_dim"], nlayers=c["head_nlayers"], use_bn=c["head_use_bn"],
                    norm_last_layer=c["norm_last_layer"])
    head.load_state_dict(strip_prefix(ckpt[network], "head."), strict=True)
    return head.eval()


# ----------------------------------------------------------------------------- (a) the backbone that is loaded
@pytest.mark.parametrize("recipe", sorted(DEFAULT_NETWORK))
def test_each_method_loads_its_evaluated_network_and_the_other_on_request(recipe, tmp_path):
    import dataclasses

    from prosmin_bench.models import get_model, get_model_spec

    ckpt = fake_checkpoint(recipe)
    path = save(ckpt, tmp_path / "ckpt.pt")
    network = DEFAULT_NETWORK[recipe]
    model = get_model(recipe, weights=path)
    assert model.network == network
    assert_state_equal(model.net, backbone_state(ckpt, network))  # exactly the chosen network's parameters
    other = backbone_state(ckpt, OTHER[network])
    assert not any(torch.equal(v, other[k]) for k, v in model.net.state_dict().items())
    # the other network when the model names it (weights.network)
    spec = get_model_spec(recipe)
    twin = get_model(dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, network=OTHER[network])),
                     weights=path)
    assert twin.network == OTHER[network]
    assert_state_equal(twin.net, other)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # the projector is the evaluated network's own head on its own backbone
        for m, net in ((model, network), (twin, OTHER[network])):
            ref = strip_prefix(ckpt[net], "head.")
            assert_state_equal(m.projector_head.head, ref)
            torch.testing.assert_close(m.projector(x), m.projector_head.head(m.net(x)))


def test_converter_choices_and_refusals():
    ckpt = fake_checkpoint("prosmin_micro")
    state, fmt = convert(ckpt)
    assert fmt == "prosmin_bench" and all(torch.equal(state[k], v) for k, v in backbone_state(ckpt, "online").items())
    state, _ = convert(ckpt, network="target")
    assert all(torch.equal(state[k], v) for k, v in backbone_state(ckpt, "target").items())
    with pytest.raises(WeightsError, match="'online' or 'target'"):
        convert(ckpt, network="bogus")
    with pytest.raises(WeightsError, match="has none"):  # a method without a target network saves target = {}
        convert({**ckpt, "target": {}}, network="target")
    plain = backbone_state(ckpt, "online")  # another format has one fixed network: naming one is an error
    with pytest.raises(WeightsError, match="applies only to this suite's pretraining checkpoints"):
        convert(plain, network="online")


def test_prosmin_target_micro_is_the_prosmin_micro_checkpoint_through_its_target():
    from prosmin_bench.models import get_model_spec

    spec, base = get_model_spec("prosmin_target_micro"), get_model_spec("prosmin_micro")
    assert spec.weights.recipe == base.weights.recipe == "prosmin_micro"  # one checkpoint, no pretraining of its own
    assert (spec.weights.network, base.weights.network) == ("target", None)
    assert (spec.variant_of, base.variant_of) == ("prosmin_micro", None)
    assert spec.method == "prosmin" and spec.scale == "mini" and "variant" in spec.description
    assert "online" in base.description


def test_the_variant_finds_its_base_models_checkpoint_in_a_weights_dir(tmp_path):
    from prosmin_bench.models import get_model_spec
    from prosmin_bench.models.weights import resolve_weights_path
    from prosmin_bench.paths import recipe_checkpoint_path

    given = save({"x": torch.zeros(1)}, tmp_path / "wd" / "prosmin_micro" / "checkpoint.pt")
    for name in ("prosmin_micro", "prosmin_target_micro"):
        assert resolve_weights_path(get_model_spec(name), weights_dir=tmp_path / "wd") == given
    home = save({"x": torch.zeros(1)}, recipe_checkpoint_path("prosmin_micro"))
    assert resolve_weights_path(get_model_spec("prosmin_target_micro")) == home  # the recipe's one checkpoint


# -------------------------------------------------------------------------- (b) the predictive head's network
def test_predictive_head_is_the_online_network_of_the_evaluated_checkpoint(tmp_path):
    from prosmin_bench.models import get_model

    ckpt = fake_checkpoint("prosmin_micro")
    path = save(ckpt, tmp_path / "ckpt.pt")
    model = get_model("prosmin_micro", weights=path)
    assert model.has_predictive and model.has_projector
    assert_state_equal(model.predictive_head, ckpt["online"])  # backbone, head and predictor: the online network
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        mu, sigma = model.predictive(x)
        z = model.projector(x)
        # the projection: a head rebuilt from the config alone on the evaluated (online) backbone
        ref = reference_head(ckpt, "online", model.embed_dim)
        torch.testing.assert_close(z, ref(model.net(x)), rtol=1e-5, atol=1e-6)
        # the predictor reads that same projection
        mu_ref, sigma_ref = model.predictive_head.predictor(z)
    torch.testing.assert_close(mu, mu_ref)
    torch.testing.assert_close(sigma, sigma_ref)
    # the target variant has no predictor (only the online network has one) and projects through the target
    target = get_model("prosmin_target_micro", weights=path)
    assert target.network == "target" and not target.has_predictive and target.has_projector
    with torch.no_grad():
        ref = reference_head(ckpt, "target", target.embed_dim)
        torch.testing.assert_close(target.projector(x), ref(target.net(x)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- (c), (d) records, reuse and feature cache
def test_records_name_the_network_and_the_variant_and_stale_target_records_are_remade(tmp_path, monkeypatch):
    import prosmin_bench
    import prosmin_bench.suite as suite
    from prosmin_bench.features import cache_key
    from prosmin_bench.models import get_model
    from prosmin_bench.paths import recipe_checkpoint_path, record_path
    from prosmin_bench.results import ResultRecord, read_record
    from prosmin_bench.runner import RunOptions

    ckpt = fake_checkpoint("prosmin_micro")
    shared = save(ckpt, recipe_checkpoint_path("prosmin_micro"))  # the one checkpoint both models read

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the finished prosmin_micro checkpoint must be used, not pretrained again")

    monkeypatch.setattr(suite, "pretrain", no_pretraining)
    res = tmp_path / "res"
    opts = RunOptions(seeds=(0,), device="cpu", results_dir=res)
    models = ["prosmin_micro", "prosmin_target_micro"]
    both = prosmin_bench.evaluate(models, ["digits_knn", "digits_collapse"], options=opts)
    assert all(isinstance(r, ResultRecord) for r in both), [getattr(r, "message", "") for r in both]
    collapse = {r.model: r for r in both if r.task == "digits_collapse"}
    assert "sigma_mean" in collapse["prosmin_micro"].mean and "proj_effective_rank" in collapse["prosmin_micro"].mean
    # the target variant: its own projector, no predictor (the online network's sigma is not the target's)
    assert "sigma_mean" not in collapse["prosmin_target_micro"].mean
    assert "proj_effective_rank" in collapse["prosmin_target_micro"].mean
    assert collapse["prosmin_micro"].mean["effective_rank"] != collapse["prosmin_target_micro"].mean["effective_rank"]
    recs = {r.model: r for r in both if r.task == "digits_knn"}
    assert recs["prosmin_micro"].model_info["network"] == "online"
    assert recs["prosmin_target_micro"].model_info["network"] == "target"
    assert recs["prosmin_target_micro"].model_info["variant_of"] == "prosmin_micro"
    assert "variant_of" not in recs["prosmin_micro"].model_info
    assert recs["prosmin_micro"].weights_sha256 == recs["prosmin_target_micro"].weights_sha256  # one file
    assert {r.model_info["weights_path"] for r in recs.values()} == {str(shared)}

    # online and target features of one file never share a cache entry
    online, target = get_model("prosmin_micro"), get_model("prosmin_target_micro")
    keys = {cache_key(m, "digits:train", "fp", "cls", "fp32", "float32") for m in (online, target)}
    assert len(keys) == 2

    # a prosmin_micro record that measured the target network (as before issue 19), or says nothing (which meant
    # the target), is stale: remade; the target variant's record stays up to date
    old = "2000-01-01T00:00:00Z"
    for stored in ("target", None):
        for model in models:
            file = record_path(res, model, "digits_knn")
            data = json.loads(file.read_text())
            if model == "prosmin_micro":
                data["model_info"]["network"] = stored
                if stored is None:
                    del data["model_info"]["network"]
            data["timestamp_utc"] = old
            file.write_text(json.dumps(data))
        prosmin_bench.evaluate(models, ["digits_knn"], options=opts)
        again = read_record(record_path(res, "prosmin_micro", "digits_knn"))
        assert again.timestamp_utc != old and again.model_info["network"] == "online"
        assert read_record(record_path(res, "prosmin_target_micro", "digits_knn")).timestamp_utc == old


# ------------------------------------------------------------------------------------------------ (e) cards
def _card(tmp_path: Path, name: str, body: str) -> None:
    folder = tmp_path / "cards"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.toml").write_text(textwrap.dedent(body))
    cards.add_card_dir(folder)


@pytest.mark.parametrize("weights, message", [
    ('recipe = "prosmin_micro"\nnetwork = "bogus"', "got network = 'bogus'"),
    ('url = "https://example.org/w.pth"\nnetwork = "target"', "without a recipe"),
    ('random = true\nnetwork = "online"', "without a recipe"),
])
def test_a_card_with_an_unusable_weights_network_is_refused_naming_the_field(tmp_path, weights, message):
    from prosmin_bench.models import get_model_spec

    _card(tmp_path, "net_card", f'name = "net_card"\narch = "vit_micro"\nscale = "mini"\n[weights]\n{weights}\n')
    with pytest.raises(CardError, match="weights.network") as err:
        get_model_spec("net_card")
    assert message in str(err.value) and "net_card.toml" in str(err.value)


def test_a_card_may_name_the_target_network_and_a_variant(tmp_path):
    from prosmin_bench.models import get_model_spec

    _card(tmp_path, "my_target", """
        name = "my_target"
        arch = "vit_micro"
        scale = "mini"
        method = "prosmin"
        variant_of = "prosmin_micro"
        [weights]
        recipe = "prosmin_micro"
        network = "target"
    """)
    spec = get_model_spec("my_target")
    assert (spec.weights.network, spec.variant_of) == ("target", "prosmin_micro")


def test_a_variant_of_an_unknown_model_is_refused(tmp_path):
    from prosmin_bench.models import get_model_spec

    _card(tmp_path, "lost", 'name = "lost"\narch = "vit_micro"\nvariant_of = "nosuch_micro"\n'
                            '[weights]\nrandom = true\n')
    with pytest.raises(CardError, match="variant_of"):
        get_model_spec("lost")
