"""Fault suite, labels and images (issue 15): every split of a task is labelled by class name in the training split's
class list, and 16-bit images are read scaled to 8 bits, not clipped to white.

Driven through the command line like tests/test_faults.py: each test asserts the exit code, the one line a user
sees, the record written and (for faults) that no image went through a backbone. The image folders hold nearly
solid colours, which any backbone separates, so a correct labelling scores 100% and a shifted one does not.
"""

from __future__ import annotations

import struct
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prosmin_bench.data import list_image_folder
from prosmin_bench.data.base import to_rgb
from prosmin_bench.paths import record_path
from prosmin_bench.results import ErrorRecord, ResultRecord, read_record
from test_faults import assert_run_error, cli, no_forward  # noqa: F401  (fixtures)

COLOURS = {"a": (220, 30, 30), "b": (30, 200, 40), "c": (40, 40, 230)}
N_TRAIN, N_TEST = 6, 3  # per class


def _card(name: str, kind: str, train: str, test: str, protocol: str) -> str:
    return textwrap.dedent(f"""
        name = "{name}"
        kind = "{kind}"
        version = 1
        suite = "mini"
        main_score = "{'top1_k5' if kind == 'knn' else 'top1'}"
        [datasets]
        train = {train}
        test = {test}
        [protocol]
    """) + protocol + "\n"


FOLDER = ('{ source = "imagefolder", root = "colours/train" }', '{ source = "imagefolder", root = "colours/test" }')
HF = ('{ source = "hf", path = "colours", split = "train" }', '{ source = "hf", path = "colours", split = "test" }')
TRANSFER = ('"cifar10:train"', '"cifar10:test"')
KNN = "ks = [5]"
LINEAR = 'epochs = 30\nbase_lrs = [0.1]\nbatch_size = 64'


@pytest.fixture
def user_cards(tmp_path):
    d = tmp_path / "cards"
    d.mkdir()
    for source, (train, test) in (("folder", FOLDER), ("hf", HF), ("transfer", TRANSFER)):
        (d / f"{source}_knn.toml").write_text(_card(f"{source}_knn", "knn", train, test, KNN))
    (d / "folder_linear.toml").write_text(_card("folder_linear", "linear", *FOLDER, LINEAR))
    ood = '{ source = "imagefolder", root = "grey" }'
    (d / "folder_ood.toml").write_text(_card("folder_ood", "ood", *FOLDER, 'head_task = "folder_linear"').replace(
        'main_score = "top1"', 'main_score = "auroc"').replace("[protocol]", f"ood = {ood}\n[protocol]"))
    return d


def make_colours(folder: Path, train: str = "abc", test: str = "bc", seed: int = 0) -> None:
    """``folder/{train,test}/<class>/<i>.png``: 32-px images of the class colour, each channel jittered by +-12."""
    rng = np.random.default_rng(seed)
    for split, classes, n in (("train", train, N_TRAIN), ("test", test, N_TEST)):
        for c in classes:
            d = folder / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(COLOURS[c]) + rng.integers(-12, 13, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")


def data_for(source: str, tmp_path: Path, **layout: str) -> Path:
    """A data root holding the colours where the card of ``source`` looks for them."""
    data = tmp_path / "data"
    make_colours(data / ("transfer/cifar10" if source == "transfer" else "colours"), **layout)
    return data


def run(capsys, cards: Path, data: Path, res: Path, *tasks: str) -> tuple[int, str]:
    argv = ["-q", "--cards", str(cards), "run", "--model", "random_micro", "--data-root", str(data),
            "--num-workers", "0", "--results", str(res)]
    for t in tasks:
        argv += ["--task", t]
    code, _, err = cli(capsys, *argv)
    return code, err


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """The `datasets` cache of the HF source in this test's folder, not the user's."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


# ---------------------------------------------------------------------------------------------------------------
# 5. Class indices are shared by the splits of a task: a test split without class `a` is scored against the
#    training split's classes by name.


@pytest.mark.parametrize("task", ["folder_knn", "folder_linear", "hf_knn", "transfer_knn"])
def test_test_split_missing_a_class_scores_by_class_name(tmp_path, user_cards, capsys, hf_cache, task):
    data, res = data_for(task.split("_")[0], tmp_path, train="abc", test="bc"), tmp_path / "res"
    code, err = run(capsys, user_cards, data, res, task)
    assert code == 0, err
    rec = read_record(record_path(res, "random_micro", task))
    assert isinstance(rec, ResultRecord)
    assert rec.main_value == 1.0, rec.per_seed  # labels shifted by the missing class scored 0% here


def test_ood_task_scores_the_id_split_by_class_name_and_leaves_the_ood_set_alone(tmp_path, user_cards, capsys):
    data, res = data_for("folder", tmp_path, train="abc", test="bc"), tmp_path / "res"
    (data / "grey" / "x").mkdir(parents=True)  # the OOD set's class is no class of the task: that is what OOD means
    for i in range(N_TEST):
        Image.fromarray(np.full((32, 32, 3), 90 + 20 * i, dtype=np.uint8)).save(data / "grey" / "x" / f"{i}.png")
    code, err = run(capsys, user_cards, data, res, "folder_ood")
    assert code == 0, err
    rec = read_record(record_path(res, "random_micro", "folder_ood"))
    assert rec.per_seed["0"]["id_top1"] == 1.0  # the head's classes a, b, c; shifted ID labels scored 0%


@pytest.mark.parametrize("source", ["folder", "hf", "transfer"])
def test_test_class_absent_from_train_is_named(tmp_path, user_cards, capsys, no_forward, hf_cache, source):
    data, res = data_for(source, tmp_path, train="bc", test="abc"), tmp_path / "res"
    task = f"{source}_knn"
    code, err = run(capsys, user_cards, data, res, task)
    folder = data / ("transfer/cifar10" if source == "transfer" else "colours")
    texts = ["Class 'a' has 3 image(s) in split", "but none in the training split",
             "add training images of 'a' or remove its images from that split"]
    if source != "hf":  # image files: the class folder is named
        texts.append(f"folder {str(folder / 'test' / 'a')!r}")
    assert_run_error(code, err, f"random_micro / {task}", *texts)
    rec = read_record(record_path(res, "random_micro", task))
    assert isinstance(rec, ErrorRecord) and rec.error_type == "DataError" and rec.traceback == ""
    assert all(t in rec.message for t in texts) and "\n" not in rec.message
    assert no_forward == []  # refused before any image went through the backbone


def test_empty_train_class_folder_is_named_and_nothing_runs(tmp_path, user_cards, capsys, no_forward):
    data, res = data_for("folder", tmp_path, train="bc", test="bc"), tmp_path / "res"
    empty = data / "colours" / "train" / "a"  # sorts first: it would shift the labels of b and c by one
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, err = run(capsys, user_cards, data, res, "folder_knn")
    texts = [f"class folder {str(empty)!r} has no images (.jpg, .jpeg, .png", "add its images or remove the folder"]
    assert_run_error(code, err, "random_micro / folder_knn", *texts)
    rec = read_record(record_path(res, "random_micro", "folder_knn"))
    assert isinstance(rec, ErrorRecord) and rec.error_type == "DataError" and all(t in rec.message for t in texts)
    assert no_forward == []
    # Removing the folder, as the message says, gives the full score.
    (empty / "notes.txt").unlink()
    empty.rmdir()
    code, err = run(capsys, user_cards, data, res, "folder_knn")
    assert code == 0, err
    assert read_record(record_path(res, "random_micro", "folder_knn")).main_value == 1.0


# ---------------------------------------------------------------------------------------------------------------
# 6. 16-bit images: scaled to 8 bits (value / 257), not clipped to white.


def _png16_rgb(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one): [H, W, 3] uint16."""
    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _gradient() -> np.ndarray:
    """A 16-bit grey gradient over the full range, 24 x 40."""
    return np.linspace(0, 65535, 24 * 40).reshape(24, 40).round().astype(np.uint16)


def _grey16(path: Path) -> np.ndarray:
    g = _gradient()
    Image.fromarray(g).save(path)  # Pillow writes uint16 as a 16-bit grey PNG and reads it back as "I;16"
    return g


def _grey16_big_endian_tiff(path: Path) -> np.ndarray:
    g = _gradient()
    Image.frombytes("I;16B", (g.shape[1], g.shape[0]), g.astype(">u2").tobytes()).save(path.with_suffix(".tif"))
    return g


def _rgb16(path: Path) -> np.ndarray:
    g = _gradient()
    rgb = np.stack([g, 65535 - g, g // 2], axis=-1)
    _png16_rgb(path, rgb)
    return rgb


@pytest.mark.parametrize("make, mode", [(_grey16, "I;16"), (_grey16_big_endian_tiff, "I;16B"), (_rgb16, "RGB")],
                         ids=["grey-png", "grey-big-endian-tiff", "rgb-png"])
def test_16bit_image_reads_as_its_8bit_version(tmp_path, make, mode):
    (tmp_path / "x").mkdir()
    wide = make(tmp_path / "x" / "img.png")
    [path] = (tmp_path / "x").iterdir()
    with Image.open(path) as im:
        assert im.mode == mode  # the mode this case is about
    expected = np.rint(wide / 257.0).astype(int)
    expected = expected if expected.ndim == 3 else np.repeat(expected[..., None], 3, axis=-1)
    got = np.asarray(list_image_folder(tmp_path).get_image(0)).astype(int)  # the path every image folder reads
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1
    assert got.mean() < 200  # not white (clipping turned all but the first column white)


def test_16bit_png_through_the_hf_source_reads_scaled(tmp_path, hf_cache):
    from prosmin_bench.data import resolve_dataset

    for c in ("a", "b"):
        (tmp_path / "hf16" / "train" / c).mkdir(parents=True)
        g = _grey16(tmp_path / "hf16" / "train" / c / "0.png")
    ds = resolve_dataset({"source": "hf", "path": "hf16", "split": "train"}, data_root=tmp_path)
    got = np.asarray(ds.get_image(0)).astype(int)
    assert np.abs(got - np.rint(g / 257.0)[..., None]).max() <= 1 and got.mean() < 200


def test_32bit_integer_grey_holding_16bit_values_reads_scaled():
    """Mode "I" (older Pillow reads 16-bit PNGs so) is scaled like "I;16"."""
    g = _gradient()
    got = np.asarray(to_rgb(Image.fromarray(g).convert("I"))).astype(int)
    assert np.abs(got[..., 0] - np.rint(g / 257.0)).max() <= 1 and (got[..., 0] == got[..., 2]).all()


def make_grey_toy(root: Path, name: str, bits: int) -> None:
    """``root/<name>/{train,test}/{dark,light}/<i>.png``: grey noise, class ``dark`` in 0..99 and ``light`` in
    150..255 (the same pixels for either bit depth), as 8-bit or 16-bit (value * 257) PNGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for c, (lo, hi) in (("dark", (0, 100)), ("light", (150, 256))):
            d = root / name / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                v = rng.integers(lo, hi, (32, 32)).astype(np.uint8)
                Image.fromarray(v if bits == 8 else v.astype(np.uint16) * 257).save(d / f"{i}.png")


def test_run_on_16bit_pngs_equals_the_run_on_their_8bit_versions(tmp_path, capsys):
    data, res, cards = tmp_path / "data", tmp_path / "res", tmp_path / "cards"
    cards.mkdir()
    for bits in (8, 16):
        make_grey_toy(data, f"grey{bits}", bits)
        train, test = (f'{{ source = "imagefolder", root = "grey{bits}/{s}" }}' for s in ("train", "test"))
        (cards / f"grey{bits}.toml").write_text(_card(f"grey{bits}", "knn", train, test, KNN))
    with Image.open(next((data / "grey16" / "train" / "dark").iterdir())) as im:
        assert im.mode == "I;16"
    code, err = run(capsys, cards, data, res, "grey8", "grey16")
    assert code == 0, err
    eight, sixteen = (read_record(record_path(res, "random_micro", f"grey{b}")) for b in (8, 16))
    assert eight.main_value == 1.0
    assert sixteen.per_seed == eight.per_seed  # clipped to white, every 16-bit image was the same: 50%
