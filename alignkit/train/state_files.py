"""State written as safetensors plus JSON, so that reading it back runs no code.

A pickle (``torch.save``) is a program: unpickling a crafted file calls whatever it names. The
files written here are read by ``json.load`` and ``safetensors`` alone, which parse data and
call nothing, so a checkpoint copied from a shared disk or a teammate is data, not code.

- ``write_tensors`` / ``read_tensors``: a flat ``{name: tensor}`` (a model's state dict) as one
  safetensors file. safetensors refuses tensors that share memory (tied embeddings); a tensor
  that is the same view of the same memory as an earlier one is stored once and named in the
  file's metadata (``aliases``), so the file is no larger than ``torch.save``'s.
- ``write_tree`` / ``read_tree``: a nested state dict (an optimizer's, a scheduler's, the RNG's)
  as ``BASE.json`` (the structure and every plain value) and, when it holds tensors,
  ``BASE.safetensors``. In the JSON a tensor is ``{"__tensor__": KEY}``, a tuple
  ``{"__tuple__": [...]}`` and a dict whose keys are not all plain strings ``{"__items__":
  [[key, value], ...]}``. A value that is none of tensor, str, int, float, bool, None, list,
  tuple, dict is refused when writing (``TypeError`` naming its path), so whatever is written can
  be read back.
- ``rng_to_tree`` / ``rng_from_tree``: the torch, CUDA, Python ``random`` and numpy generator
  states as such a tree (numpy's as its key array plus scalars), checked on scratch generators
  before anything is applied.

Every reader raises ``StateFileError`` naming the file at fault.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

_TAGS = ("__tensor__", "__tuple__", "__items__")


class StateFileError(ValueError):
    """A state file cannot be read: ``path`` is the file, ``reason`` what is wrong with it."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path, write):
    """``write(tmp)`` then one rename: a reader never sees half a file under ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    # safetensors creates its files 0600; a checkpoint is read by whoever could read a
    # torch.save file (teammates resuming from a shared disk): the umask's mode, as open() gives
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


# ------------------------------------------------------------------ flat tensors
def write_tensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    out, aliases, seen = {}, {}, {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if t.numel():
            view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                    t.stride(), t.dtype)
            if view in seen:
                aliases[name] = seen[view]
                continue
            seen[view] = name
        out[name] = t
    # safetensors wants every stored tensor contiguous and alone in its memory: a partial
    # overlap (two different views of one storage) is copied apart
    ptrs = {}
    for name, t in out.items():
        if t.numel():
            ptrs.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    for names in ptrs.values():
        for name in names[1:]:
            out[name] = out[name].clone()
    out = {k: v.contiguous() for k, v in out.items()}
    meta = dict(metadata or {}, aliases=json.dumps(aliases, sort_keys=True))
    _atomic(path, lambda tmp: save_file(out, tmp, metadata=meta))


def read_tensors(path: str) -> dict:
    """``{name: tensor}`` on the CPU; an alias shares its target's tensor."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:                # missing, truncated, not safetensors at all
        raise StateFileError(path, f"cannot be read ({type(e).__name__}: {e})") from None
    try:
        aliases = json.loads(meta.get("aliases", "{}"))
    except ValueError as e:
        raise StateFileError(path, f"its aliases metadata is not JSON ({e})") from None
    if not isinstance(aliases, dict):
        raise StateFileError(path, "its aliases metadata is not a mapping")
    for name, target in aliases.items():
        if not isinstance(target, str) or target not in tensors or name in tensors:
            raise StateFileError(path, f"alias {name!r} -> {target!r} names no stored tensor")
        tensors[name] = tensors[target]
    return tensors


# ------------------------------------------------------------------ nested state dicts
def _encode(x, path, tensors):
    if isinstance(x, torch.Tensor):
        key = "/".join(path) or "."
        while key in tensors:                 # "1" and 1 as dict keys: keep both
            key += "'"
        tensors[key] = x
        return {"__tensor__": key}
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, float)):           # np.float64 is a float; its value is kept
        return x if type(x) in (int, float) else (int(x) if isinstance(x, int) else float(x))
    if isinstance(x, np.generic) and isinstance(x.item(), (bool, int, float)):
        return x.item()
    if isinstance(x, list):
        return [_encode(v, path + [str(i)], tensors) for i, v in enumerate(x)]
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, path + [str(i)], tensors) for i, v in enumerate(x)]}
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in x):
            return {k: _encode(v, path + [k], tensors) for k, v in x.items()}
        return {"__items__": [[_encode(k, path + ["key"], tensors),
                               _encode(v, path + [str(k)], tensors)] for k, v in x.items()]}
    raise TypeError(f"{'/'.join(path) or 'the state'}: a {type(x).__name__} is not a tensor or a "
                    "plain value (str, int, float, bool, None, list, tuple, dict), so it cannot "
                    "be stored without pickling it")


def write_tree(tree, base: str) -> None:
    """``BASE.json`` and, when ``tree`` holds tensors, ``BASE.safetensors``."""
    tensors = {}
    doc = {"tree": _encode(tree, [], tensors)}
    if tensors:
        write_tensors(tensors, base + ".safetensors")
    elif os.path.exists(base + ".safetensors"):
        os.remove(base + ".safetensors")
    text = json.dumps(doc)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic(base + ".json", write)


def _has_tensor(x):
    if isinstance(x, list):
        return any(_has_tensor(v) for v in x)
    if isinstance(x, dict):
        return "__tensor__" in x or any(_has_tensor(v) for v in x.values())
    return False


def _decode(x, tensors, where):
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, list):
        return [_decode(v, tensors, where) for v in x]
    if not isinstance(x, dict):
        raise StateFileError(where, f"unexpected JSON value {x!r}")
    tags = [k for k in x if k.startswith("__")]
    if tags:
        if len(x) != 1 or tags[0] not in _TAGS:
            raise StateFileError(where, f"unknown entry {sorted(x)[:3]}")
        tag, v = tags[0], x[tags[0]]
        if tag == "__tensor__":
            if not isinstance(v, str) or tensors is None or v not in tensors:
                raise StateFileError(where, f"names tensor {v!r}, which its .safetensors lacks")
            return tensors[v]
        if not isinstance(v, list):
            raise StateFileError(where, f"{tag} holds a {type(v).__name__}, not a list")
        if tag == "__tuple__":
            return tuple(_decode(e, tensors, where) for e in v)
        if not all(isinstance(e, list) and len(e) == 2 for e in v):
            raise StateFileError(where, "__items__ holds something other than [key, value] pairs")
        out = {}
        for k, e in v:
            k = _decode(k, tensors, where)
            try:
                out[k] = _decode(e, tensors, where)
            except TypeError:                 # an unhashable key (a list)
                raise StateFileError(where, f"key {k!r} is not hashable") from None
        return out
    return {k: _decode(v, tensors, where) for k, v in x.items()}


def read_tree(base: str):
    """The tree ``write_tree`` wrote; ``StateFileError`` naming ``BASE.json`` or
    ``BASE.safetensors`` when either is missing, truncated or malformed."""
    where = base + ".json"
    try:
        with open(where, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise StateFileError(where, f"cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or set(doc) != {"tree"}:
        raise StateFileError(where, "is not a state file (no single 'tree' entry)")
    try:
        tensors = read_tensors(base + ".safetensors") if _has_tensor(doc["tree"]) else None
        return _decode(doc["tree"], tensors, where)
    except RecursionError:
        raise StateFileError(where, "is nested too deeply") from None


# ------------------------------------------------------------------ random generators
def rng_to_tree(state: dict) -> dict:
    """``{"torch", "cuda", "python", "numpy"}`` as ``checkpoint.rng_state`` returns them -> a tree
    of tensors and plain values."""
    version, internal, gauss_next = state["python"]
    name, key, pos, has_gauss, cached = state["numpy"]
    return {"torch": state["torch"], "cuda": state.get("cuda"),
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "numpy": {"bit_generator": name,
                      "key": torch.from_numpy(np.asarray(key, dtype=np.uint32).astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": cached}}


def rng_from_tree(tree, where) -> dict:
    """The states ``checkpoint.set_rng_state`` applies, each first set on a scratch generator so
    a malformed one is refused (``StateFileError`` naming ``where``) before any is applied."""
    try:
        py, npy = tree["python"], tree["numpy"]
        t, key, cuda = tree["torch"], npy["key"], tree.get("cuda")
        ok = (isinstance(t, torch.Tensor) and t.dtype == torch.uint8
              and isinstance(py["state"], torch.Tensor) and py["state"].dim() == 1
              and isinstance(key, torch.Tensor) and key.dim() == 1
              and isinstance(npy["bit_generator"], str)
              and (cuda is None or (isinstance(cuda, list) and all(
                  isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda))))
        if not ok:
            raise ValueError("a state of the wrong type")
        k = key.numpy()
        if k.size and (k.min() < 0 or k.max() > 0xFFFFFFFF):
            raise ValueError("numpy's key is out of the uint32 range")
        state = {"torch": t, "cuda": cuda,
                 "python": (py["version"], tuple(py["state"].tolist()), py["gauss_next"]),
                 "numpy": (npy["bit_generator"], k.astype(np.uint32), npy["pos"],
                           npy["has_gauss"], npy["cached_gaussian"])}
        torch.Generator().set_state(state["torch"])
        random.Random().setstate(state["python"])
        np.random.RandomState().set_state(state["numpy"])
    except StateFileError:
        raise
    except Exception as e:
        raise StateFileError(where, f"not a generator state ({type(e).__name__}: {e})") from None
    return state
