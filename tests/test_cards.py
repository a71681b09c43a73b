"""Cards are data: read from the checkout, from an installed wheel's package data, and from user folders."""

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import prosmin_bench
from prosmin_bench import cards, get_task, list_models, list_tasks
from prosmin_bench.errors import CardError, DuplicateNameError

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_cards_are_found_from_the_source_tree():
    assert cards.source_tree_dir("tasks") == ROOT / "tasks"
    assert {"digits_knn", "digits_linear", "imagenet_knn", "imagenet_linear"} <= set(list_tasks())
    assert get_task("digits_knn").main_score == "top1_k20"


def test_every_package_folder_is_listed_in_pyproject():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "prosmin_bench").rglob("__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


def test_wheel_ships_cards_and_reads_them_without_a_checkout(tmp_path):
    """Build the wheel, unpack it away from the checkout, and list tasks from its package data alone."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("prosmin_bench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped_tasks = sorted(Path(n).name for n in names if n.startswith("prosmin_bench/_cards/tasks/"))
    assert shipped_tasks == sorted(p.name for p in (ROOT / "tasks").glob("*.toml"))
    assert any(n.startswith("prosmin_bench/_refdata/imagenet_1percent.txt") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = textwrap.dedent(
        """
        import prosmin_bench, prosmin_bench.cards as c
        assert c.source_tree_dir("tasks") is None, c.source_tree_dir("tasks")
        assert c.package_data_dir("tasks") is not None
        print(",".join(prosmin_bench.list_tasks()))
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert set(run.stdout.strip().split(",")) == {p.stem for p in (ROOT / "tasks").glob("*.toml")}


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(textwrap.dedent(text))
    return p


GOOD = """
    name = "my_knn"
    kind = "knn"
    version = 2
    suite = "mini"
    main_score = "top1_k5"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    [protocol]
    ks = [5]
"""


def test_user_cards_from_cards_dir_and_env(tmp_path, monkeypatch):
    _write(tmp_path / "a", "my_knn.toml", GOOD)
    cards.add_card_dir(tmp_path / "a")
    assert get_task("my_knn").version == 2
    cards.clear_card_dirs()
    assert "my_knn" not in list_tasks()
    monkeypatch.setenv("PROSMIN_BENCH_CARDS", str(tmp_path / "a"))
    cards.clear_card_dirs()  # drop caches so the env var is read again
    assert "my_knn" in list_tasks()


def test_user_model_card(tmp_path):
    _write(tmp_path / "m" / "baselines", "tiny.toml", """
        name = "tiny_random"
        arch = "vit_micro"
        scale = "mini"
        [weights]
        random = true
        seed = 3
        [preprocess]
        resize = 36
        crop = 32
    """)
    cards.add_card_dir(tmp_path / "m")
    assert "tiny_random" in list_models()
    model = prosmin_bench.get_model("tiny_random")
    assert model.embed_dim == 96


@pytest.mark.parametrize("weights, message", [
    ("random = true\ninit = \"xavier\"", "must be one of ['timm', 'sincos', 'mocov3']"),
    ("recipe = \"prosmin_micro\"\ninit = \"sincos\"", "needs random = true"),
])
def test_model_card_random_init_is_checked(tmp_path, weights, message):
    _write(tmp_path / "m" / "baselines", "tiny.toml", f"""
        name = "tiny_init"
        arch = "vit_micro"
        scale = "mini"
        [weights]
        {weights}
    """)
    cards.add_card_dir(tmp_path / "m")
    with pytest.raises(CardError, match="weights.init") as err:
        list_models()
    assert message in str(err.value)


@pytest.mark.parametrize(
    "text, field",
    [
        (GOOD.replace('version = 2', 'version = "two"'), "'version' must be int"),
        (GOOD.replace('main_score = "top1_k5"', ''), "required field 'main_score' is missing"),
        (GOOD.replace('kind = "knn"', 'kind = "knnn"'), "field 'kind' names unknown protocol kind 'knnn'"),
        (GOOD.replace('ks = [5]', 'ks = [5]\nfoo = 1'), "unknown protocol field(s) ['foo']"),
        (GOOD.replace('main_score = "top1_k5"', 'main_score = "top1_k20"'), "field 'main_score' is 'top1_k20'"),
        ("bogus = 1\n" + GOOD, "unknown field(s) ['bogus']"),
        ("name = [\nkind = 'knn'\n", "is not valid TOML"),
    ],
)
def test_malformed_card_error_names_file_and_field(tmp_path, text, field):
    path = _write(tmp_path / "bad", "broken.toml", text)
    cards.add_card_dir(tmp_path / "bad")
    with pytest.raises(CardError) as err:
        list_tasks()
    assert str(path) in str(err.value)
    assert field in str(err.value)


def test_user_card_cannot_shadow_a_shipped_name(tmp_path):
    _write(tmp_path / "dup", "digits_knn.toml", GOOD.replace('"my_knn"', '"digits_knn"'))
    cards.add_card_dir(tmp_path / "dup")
    with pytest.raises(DuplicateNameError, match="digits_knn"):
        list_tasks()


def test_missing_card_dir_is_an_error(tmp_path):
    with pytest.raises(CardError, match="does not exist"):
        cards.add_card_dir(tmp_path / "nope")
