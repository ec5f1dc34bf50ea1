"""The package's imports run one way (issue #38): read every import in alignkit/ (function-level
ones too) with ast, and fail on one that reaches a higher layer, a sibling on the same layer, or the
trainer's modules from outside the trainer.

    _C, kernels (raw)  <  ops  <  api, model  <  losses  <  train, testing  <  integrations, rl
        <  bench  <  cli

``alignkit/__init__.py`` is the facade over all of them and is not checked. A new subpackage must be
given a layer here (an unknown one fails), so the order is decided, not inherited.
"""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "alignkit")

LAYERS = [("_C", "kernels"), ("ops",), ("api", "model"), ("losses",), ("train", "testing"),
          ("integrations", "rl"), ("bench",), ("cli",)]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
FACADE = len(LAYERS) - 2        # `import alignkit` loads the drop-ins: only bench and cli may
# the trainer's public API is the package alignkit.train (its __init__); its modules are its own,
# and the CLI's (which drives the trainer's config, demo, plots and checkpoint conversion)
TRAIN_INTERNALS_OK = ("train", "cli")


def _unit(module: str) -> str:
    """alignkit.X.Y -> X; the bare package -> "alignkit"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "alignkit"


def _imports(path: str, module: str):
    """(line, imported module) for every import of alignkit in one file, relative ones resolved;
    ``from alignkit import X`` names the submodule X when there is one."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                stem = os.path.join(REPO, *sub.split("."))
                parent = os.path.join(REPO, *base.split("."))
                is_mod = os.path.isdir(stem) or os.path.isfile(stem + ".py") or \
                    (os.path.isdir(parent) and any(f.startswith(a.name + ".") and f.endswith(".so")
                                                   for f in os.listdir(parent)))
                yield node.lineno, sub if is_mod else base


def violations():
    found, checked = [], 0
    for root, dirs, files in os.walk(PKG):
        dirs[:] = [d for d in dirs if d != "__pycache__" and d != "kernels"]
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, REPO)
            module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
            src = _unit(module)
            if src == "alignkit":
                continue                      # the facade
            if src not in LAYER:
                found.append(f"{rel}: alignkit.{src} has no layer in tests/test_layering.py")
                continue
            for line, target in _imports(path, module):
                if target.split(".")[0] != "alignkit":
                    continue
                checked += 1
                dst = _unit(target)
                where = f"{rel}:{line} imports {target}"
                if dst == src:
                    continue
                if dst == "alignkit":
                    if LAYER[src] < FACADE:
                        found.append(f"{where}: the facade, from below the drop-ins")
                elif dst not in LAYER:
                    found.append(f"{where}: alignkit.{dst} has no layer")
                elif LAYER[dst] >= LAYER[src]:
                    found.append(f"{where}: {dst} is not below {src}")
                elif dst == "train" and target != "alignkit.train" and \
                        src not in TRAIN_INTERNALS_OK:
                    found.append(f"{where}: outside the trainer, import its public API "
                                 "(alignkit.train)")
    return sorted(set(found)), checked


def test_imports_follow_the_layers():
    found, checked = violations()
    assert checked > 150, checked             # the walk read the package's imports
    assert not found, "\n".join(found)


def test_a_bad_import_is_caught(tmp_path, monkeypatch):
    """The check can fail: an upward import in ops, and rl reaching a trainer module."""
    bad = {os.path.join(PKG, "ops", "env.py"): "from alignkit.losses import preference_loss\n",
           os.path.join(PKG, "rl", "sample.py"): "from alignkit.train.data import load_rows\n"}
    real_open = open

    def patched(path, *a, **k):
        f = real_open(path, *a, **k)
        if os.path.abspath(path) in bad:
            text = f.read() + "\n" + bad[os.path.abspath(path)]
            f.close()
            p = tmp_path / os.path.basename(path)
            p.write_text(text, encoding="utf-8")
            return real_open(p, *a, **k)
        return f

    monkeypatch.setattr("builtins.open", patched)
    found, _ = violations()
    assert any("ops/env.py" in v and "losses is not below ops" in v for v in found), found
    assert any("rl/sample.py" in v and "public API" in v for v in found), found
