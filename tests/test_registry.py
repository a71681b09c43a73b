import pytest

from prosmin_bench.errors import DuplicateNameError, UnknownNameError
from prosmin_bench.registry import Registry


def test_duplicate_name_is_an_error_naming_both_places():
    reg: Registry[int] = Registry("model", "prosmin-bench list models")
    reg.add("dino_micro", 1, origin="a.py")
    with pytest.raises(DuplicateNameError, match=r"'dino_micro' is already registered \(first in a.py\)"):
        reg.add("dino_micro", 2, origin="b.py")
    assert reg.get("dino_micro") == 1


def test_unknown_name_lists_close_matches_and_how_to_list_all():
    reg: Registry[int] = Registry("model", "prosmin-bench list models")
    for name in ("prosmin_micro", "dino_micro", "ibot_micro", "random_micro"):
        reg.add(name, 0)
    with pytest.raises(UnknownNameError) as err:
        reg.get("prosmin_mikro")
    msg = str(err.value)
    assert "Unknown model 'prosmin_mikro'" in msg
    assert "'prosmin_micro'" in msg
    assert "prosmin-bench list models" in msg


def test_decorator_registers_under_given_name():
    reg: Registry[type] = Registry("task kind")

    @reg.register("knn")
    class K:
        pass

    assert reg.get("knn") is K and "knn" in reg and reg.names() == ["knn"]
