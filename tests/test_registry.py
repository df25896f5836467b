import subprocess
import sys

import pytest

from sparsekit.registry import Registry
from sparsekit.scores import CRITERIA


def table() -> Registry:
    reg = Registry("thing", meta={"fast": False, "dtypes": ("float32",)})
    reg.register("b", fast=True)(len)
    reg.register("a", dtypes=("float32", "bfloat16"))(abs)
    return reg


def test_metadata_defaults_and_overrides():
    reg = table()
    assert dict(reg.meta("a")) == {"fast": False, "dtypes": ("float32", "bfloat16")}
    assert dict(reg.meta("b")) == {"fast": True, "dtypes": ("float32",)}
    assert reg.get("b") is len


def test_metadata_is_read_only():
    with pytest.raises(TypeError):
        table().meta("a")["fast"] = True  # type: ignore[index]


def test_names_select_by_metadata():
    reg = table()
    assert reg.names() == ["a", "b"]
    assert reg.names(fast=True) == ["b"]
    assert reg.names(fast=False, dtypes=("float32",)) == []
    with pytest.raises(TypeError, match="unknown metadata \\['slow'\\].*dtypes, fast"):
        reg.names(slow=True)


def test_undeclared_metadata_is_rejected():
    with pytest.raises(TypeError, match="unknown metadata \\['fsat'\\] for thing 'c'"):
        table().register("c", fsat=True)


def test_unknown_name_and_wrong_type():
    with pytest.raises(ValueError, match="unknown thing 'z'; accepted: a, b"):
        table().meta("z")
    with pytest.raises(TypeError, match="thing must be a string"):
        table().get(3)  # type: ignore[arg-type]


def test_ordered_keeps_registration_order():
    reg = Registry("method", ordered=True)
    for name in ("teal", "wina", "cats"):
        reg.register(name)(abs)
    assert list(reg) == ["teal", "wina", "cats"] and len(reg) == 3
    with pytest.raises(ValueError, match="accepted: teal, wina, cats"):
        reg.get("relu")


def test_duplicate_name_is_rejected():
    with pytest.raises(ValueError, match="already registered"):
        table().register("a")(abs)


def test_criteria_carry_their_data_needs():
    assert CRITERIA.names(data_driven=True) == [
        "flap", "gradient", "grasp", "snip", "synflow", "taylor", "taylor:accumulated", "wanda"]
    assert CRITERIA.names(needs_labels=True) == ["gradient", "grasp", "snip", "taylor",
                                                 "taylor:accumulated"]
    assert CRITERIA.meta("magnitude")["data_driven"] is False
    assert CRITERIA.meta("graph:erdos_renyi")["data_driven"] is False


def test_data_driven_is_deprecated_and_derived():
    import sparsekit.scores as scores

    with pytest.warns(DeprecationWarning, match="CRITERIA.names\\(data_driven=True\\)"):
        old = scores.DATA_DRIVEN
    assert old == frozenset({"flap", "gradient", "snip", "taylor", "taylor:accumulated", "grasp",
                             "synflow", "wanda"})


@pytest.mark.parametrize("module", ["sparsekit.scores", "sparsekit.graph.priors",
                                    "sparsekit.scores.graph"])
def test_imports_without_cycle(module):
    # Each in a fresh interpreter: a cycle shows up only for the module imported first.
    code = (f"import {module}; import sparsekit.scores as s; "
            "assert 'graph:erdos_renyi' in s.CRITERIA")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_graph_priors_names_still_importable():
    from sparsekit.graph import KINDS, prior_masks
    from sparsekit.graph.priors import REWIRE, erdos_renyi

    assert list(KINDS) == ["erdos_renyi", "watts_strogatz", "barabasi_albert"]
    assert callable(prior_masks) and callable(erdos_renyi) and REWIRE == 0.1
