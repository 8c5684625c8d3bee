"""The wheel holds every package of the source tree: pyproject.toml lists packages by hand (the folders
``convert/`` and ``app/`` install as ``mlx_llama4.convert`` and ``mlx_llama4.app``), and a package left out
works in an editable install yet is missing from ``pip install .``."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    assert found == listed, f"pyproject.toml [tool.setuptools] packages: missing {sorted(found - listed)}, " \
                            f"extra {sorted(listed - found)}"
