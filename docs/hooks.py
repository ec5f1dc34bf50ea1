"""mkdocs hooks: the pages that cannot drift from the code are filled in at build time.

    {{ train_config_reference }}      the TrainConfig table (docs/gen_config.py)
    {{ api MODULE }}                  a mkdocstrings entry for every public name of MODULE: its
                                      __all__, else the functions and classes it defines

Run by ``make docs`` (mkdocs build --strict); nothing generated is checked in.
"""
import importlib
import importlib.util
import inspect
import os
import re

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("gen_config", os.path.join(_HERE, "gen_config.py"))
gen_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_config)

_API = re.compile(r"^\{\{ api ([\w.]+) \}\}$", re.M)


def public_names(module):
    """__all__, else the public functions and classes the module defines itself."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, o in vars(module).items() if not n.startswith("_")
                 and (inspect.isfunction(o) or inspect.isclass(o))
                 and o.__module__ == module.__name__]
    return list(names)


def api_markdown(modname: str) -> str:
    """One ``::: path`` per public callable (at the module that defines it, so lazy and re-exported
    names resolve statically), and the constants as a table of their values."""
    module = importlib.import_module(modname)
    blocks, consts, seen = [], [], {}
    for name in public_names(module):
        obj = getattr(module, name)
        if id(obj) in seen:                       # an alias (EngineOptions is TileOptions)
            blocks.append(f"`{name}`: the same object as `{seen[id(obj)]}`.\n")
        elif inspect.isfunction(obj) or inspect.isclass(obj):
            seen[id(obj)] = name
            blocks.append(f"::: {obj.__module__}.{obj.__qualname__}\n    options:\n"
                          f"      heading_level: 3\n      show_root_full_path: false\n")
        else:
            consts.append(f"| `{name}` | `{obj!r}` |")
    out = "\n".join(blocks)
    if consts:
        out += "\n### Constants\n\n| name | value |\n|---|---|\n" + "\n".join(consts) + "\n"
    return out


def on_page_markdown(markdown, page, config, files):
    if "{{ train_config_reference }}" in markdown:
        markdown = markdown.replace("{{ train_config_reference }}", gen_config.render())
    return _API.sub(lambda m: api_markdown(m.group(1)), markdown)
