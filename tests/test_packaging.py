"""The wheel ships every subpackage: pyproject's static package list names each directory of
alignkit/ that holds an __init__.py (an editable install would hide a missing one)."""
import os

import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_listed():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {"alignkit"}
    for root, dirs, files in os.walk(os.path.join(REPO, "alignkit")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(root, REPO)
        if "__init__.py" in files:
            found.add(rel.replace(os.sep, "."))
    assert found - listed == set(), f"not in pyproject's packages: {sorted(found - listed)}"
