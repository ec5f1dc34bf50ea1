"""The trainer's config reference, rendered from ``alignkit.train.config.TrainConfig``: each field's
name, type and default from the dataclass, its description from the comments beside it in the
source, its allowed values from the module's choice tuples. ``python docs/gen_config.py`` prints it;
the docs build (docs/hooks.py) puts it into trainer.md."""
import dataclasses
import inspect
import re

from alignkit.train import config as C

CHOICES = {"attn_implementation": C.ATTN_IMPLEMENTATIONS, "data_format": C.DATA_FORMATS,
           "loss": C.LOSSES, "reference": C.REFERENCES, "packing": C.PACKINGS,
           "precision": C.PRECISIONS, "lr_scheduler": C.SCHEDULES}
_FIELD = re.compile(r"^    (\w+): [^=]+?(?:=.*?)?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^    #\s*(.*)$")


def _comments():
    """{field: (section, description)} from the class body's comments: a one-word comment line
    starts a section, other comment lines describe the field below them, a trailing comment the
    field on its line."""
    out, section, pending = {}, "model", []
    for line in inspect.getsource(C.TrainConfig).split("\n"):
        if line.startswith("    def "):
            break
        m = _COMMENT.match(line)
        if m:
            text = m.group(1)
            if re.fullmatch(r"[a-z]+", text):
                section, pending = text, []
            else:
                pending.append(text)
            continue
        m = _FIELD.match(line)
        if m:
            desc = " ".join(pending + ([m.group(2)] if m.group(2) else []))
            out[m.group(1)] = (section, desc)
            pending = []
    return out


def _default(f):
    if f.default is not dataclasses.MISSING:
        return "null" if f.default is None else repr(f.default).replace("'", "")
    return repr(f.default_factory()).replace("'", "")


def render() -> str:
    notes = _comments()
    rows, section = [], None
    for f in dataclasses.fields(C.TrainConfig):
        sec, desc = notes.get(f.name, (section, ""))
        if sec != section:
            section = sec
            rows.append(f"\n### {sec}\n\n| key | type | default | what |\n|---|---|---|---|")
        if f.name in CHOICES:
            desc = (desc + "; " if desc else "") + "one of " + ", ".join(f"`{c}`" for c in CHOICES[f.name])
        typ = str(f.type).replace("|", "\\|")
        desc = desc.replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{typ}` | `{_default(f)}` | {desc} |")
    return (f"{len(dataclasses.fields(C.TrainConfig))} keys. " + inspect.getdoc(C).split("\n\n")[1]
            .replace("\n", " ") + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    print(render())
