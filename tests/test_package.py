"""The package surface: subpackages reachable as attributes, heavy dependencies lazy."""

import subprocess
import sys

import pytest

import sparsekit


def _imported_after(code: str) -> set[str]:
    """Top-level module names imported by a fresh interpreter after running ``code``."""
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=900, check=True)
    return set(done.stdout.split())


def test_import_sparsekit_does_not_import_optional_dependencies():
    loaded = _imported_after("import sparsekit")
    assert not loaded & {"transformers", "networkx", "matplotlib"}


@pytest.mark.parametrize("name", ["llm", "activation", "data", "graph", "engine", "models"])
def test_subpackages_are_attributes(name):
    module = getattr(sparsekit, name)
    assert module.__name__ == f"sparsekit.{name}"
    assert name in dir(sparsekit)


def test_llm_prune_reachable_as_the_readme_writes_it():
    loaded = _imported_after("import sparsekit\nsparsekit.llm.prune")
    assert "sparsekit" in loaded
    assert callable(sparsekit.llm.prune)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        sparsekit.no_such_thing  # noqa: B018
