"""Nothing in the repo shadows a dependency once the repo root is on sys.path (issue #32).

`python -m pytest`, `python -m bench.…` and `python -c …` put the current directory first on
sys.path. transformers >= 5.25 installs the hub package `kernels`; the repo's top-level kernels/
once held an __init__.py, so from the repo root `import kernels` found the repo, and transformers'
hub integration failed at import. The rule now: no top-level folder but alignkit/ is a regular
package (a folder without __init__.py is a namespace portion, which an installed package wins
over), and no top-level module or package shares a name with an installed distribution's.
"""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# folders run by name from the repo root (`python -m bench.core`): an installed package of that name
# would win over the namespace folder and break those commands
RUN_BY_NAME = ("bench",)


def _top_level_names():
    """{name: kind} of what `import name` could find in the repo root: packages and modules."""
    names = {}
    for entry in os.listdir(REPO):
        path = os.path.join(REPO, entry)
        if entry.startswith(".") or not (entry.isidentifier() or entry.endswith(".py")):
            continue
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            names[entry] = "package"
        elif os.path.isdir(path) and any(f.endswith(".py") for f in os.listdir(path)):
            names[entry] = "namespace"
        elif entry.endswith(".py") and entry[:-3].isidentifier():
            names[entry[:-3]] = "module"
    return names


def test_only_alignkit_is_a_regular_package():
    names = _top_level_names()
    assert names.get("alignkit") == "package"
    regular = sorted(n for n, kind in names.items() if kind == "package" and n != "alignkit")
    assert regular == [], (f"top-level folders with an __init__.py would shadow any installed "
                           f"package of the same name from the repo root: {regular}")
    assert names.get("kernels") == "namespace"


def test_no_top_level_name_is_a_dependency():
    installed = importlib.metadata.packages_distributions()
    clash = sorted(f"{n} ({kind}, installed by {installed[n]})" for n, kind in _top_level_names().items()
                   if n != "alignkit" and n in installed and (kind != "namespace" or n in RUN_BY_NAME))
    assert clash == [], f"repo names that shadow, or are shadowed by, an installed package: {clash}"


def _run_from_root(code):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _hub_kernels_installed():
    # asked from a neutral directory, so the repo cannot answer for it
    p = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                        "s = u.find_spec('kernels'); print(s is not None and s.origin is not None)"],
                       cwd=os.path.dirname(REPO), capture_output=True, text=True, timeout=120)
    return p.stdout.strip() == "True"


def test_import_kernels_from_the_repo_root_is_the_hub_package():
    if not _hub_kernels_installed():
        # without the hub package, the repo's files still refuse the top-level name
        p = _run_from_root("import kernels.linear_logprobs")
        assert p.returncode != 0 and "ImportError" in p.stderr, p.stderr
        return
    p = _run_from_root("import kernels, os; print(os.path.realpath(kernels.__file__))")
    assert p.returncode == 0, p.stderr
    origin = p.stdout.strip()
    # (the venv may live inside the checkout: the repo's own folder is what must not answer)
    ours = os.path.realpath(os.path.join(REPO, "kernels")) + os.sep
    assert not origin.startswith(ours), f"`import kernels` found the repo's folder: {origin}"


def test_transformers_hub_kernels_imports_from_the_repo_root():
    pytest.importorskip("transformers")
    if not _hub_kernels_installed():
        pytest.skip("the hub package `kernels` is not installed")
    p = _run_from_root("from transformers.integrations import hub_kernels")
    assert p.returncode == 0, p.stderr[-2000:]


def test_kernel_files_refuse_a_top_level_name():
    pytest.importorskip("triton")
    path = os.path.join(REPO, "kernels", "linear_logprobs.py")
    spec = importlib.util.spec_from_file_location("kernels.linear_logprobs", path)
    with pytest.raises(ImportError, match="alignkit.kernels"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_alignkit_kernels_are_the_repo_files():
    spec = importlib.util.find_spec("alignkit.kernels.linear_logprobs")
    if spec is None or not os.path.realpath(spec.origin).startswith(os.path.realpath(REPO)):
        pytest.skip("alignkit is installed from elsewhere, not from this checkout")
    assert os.path.realpath(spec.origin) == os.path.realpath(
        os.path.join(REPO, "kernels", "linear_logprobs.py"))
