"""The pins in constraints.txt, written and compared (issue #32). Run with the venv's python.

    python .ci/pins.py freeze constraints.txt   # pin every installed release (make update-constraints)
    python .ci/pins.py diff constraints.txt     # one line naming each release that differs from the pins;
                                                # exit 3 when one does

Local version labels are dropped (torch 2.13.0+cpu pins as 2.13.0, which the CPU wheel satisfies).
alignkit itself, pip and the build tools are not pinned.
"""
import datetime
import importlib.metadata as md
import platform
import re
import sys

SKIP = {"alignkit", "pip", "setuptools", "wheel"}


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def installed():
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and _norm(name) not in SKIP:
            out[_norm(name)] = dist.version.split("+")[0]
    return out


def read(path):
    pins = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_norm(name)] = version.strip()
    return pins


def freeze(path):
    rows = sorted(installed().items())
    with open(path, "w") as f:
        f.write(f"# The releases `make demo` and `make test` were last verified with "
                f"({datetime.date.today()}, Python {platform.python_version()}).\n"
                f"# make venv installs from these; make update-constraints rewrites them from the "
                f"newest releases pyproject's ranges allow.\n")
        f.writelines(f"{name}=={version}\n" for name, version in rows)
    print(f"{path}: {len(rows)} pins")


def diff(path):
    """Prints the releases that differ from the pins; exit status 0 when none does, 3 otherwise
    (.ci/run runs the suite again only then: the same releases were tested by the pinned run)."""
    pins, now = read(path), installed()
    changed = [f"{n} {pins[n]} -> {v}" for n, v in sorted(now.items()) if n in pins and pins[n] != v]
    added = [f"{n} {v} (new)" for n, v in sorted(now.items()) if n not in pins]
    rows = changed + added
    print(f"releases that differ from {path}: " + (", ".join(rows) if rows else "none"))
    return 3 if rows else 0


if __name__ == "__main__":
    cmd, path = sys.argv[1:3]
    sys.exit({"freeze": freeze, "diff": diff}[cmd](path) or 0)
