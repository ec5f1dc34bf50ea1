"""Training data: rows in six shapes -> tokenised examples.

Row shapes (``data_format: auto`` tells them apart by their keys):
- ``pairs``: {"prompt": str, "chosen": str, "rejected": str}
- ``messages`` (TRL conversational): {"prompt": [msg], "chosen": [msg], "rejected": [msg]}, or
  {"chosen": [msg], "rejected": [msg]} with the prompt as their common leading messages;
  msg = {"role": ..., "content": ...}
- ``sharegpt`` (LLaMA-Factory): {"conversations": [{"from": "human"|"gpt"|"system",
  "value": ...}], "chosen": {"from": "gpt", "value": ...}, "rejected": {...}}
- ``kto`` (unpaired): {"messages": [msg, ..., assistant msg], "label": bool}, or
  {"prompt": str or [msg], "completion": str or assistant msg, "label": bool}
- ``ranked`` (reward models, K >= 2 responses best first): {"prompt": str or [msg],
  "responses": [str or assistant msg, ...]}
- ``sft``: {"messages": [msg, ..., assistant msg]}, or {"prompt": str or [msg], "completion": str
  or assistant msg}

Which shapes each loss reads: the preference losses read pairs (pairs, messages, sharegpt); kto
reads kto; reward reads pairs and ranked rows (a pair is K = 2), with an optional number
``margin`` on every row or on none; sft reads sft rows, or pairs, training on the chosen response.

Tokenisation: with a chat template, the prompt is ``apply_chat_template(prompt, add_generation_prompt
=True)`` and the response is what the template adds for the assistant turn (its end-of-turn token
included). Without one, messages are rendered as "role: content" lines, the prompt gets BOS (when
the tokenizer has one) and the response gets EOS (``append_eos``).

Truncation, documented: the prompt keeps its *last* ``max_prompt_length`` tokens (the end is what
the response follows); the response then keeps its first ``max_length - len(prompt)`` tokens. So a
prompt longer than ``max_length`` is cut to ``max_prompt_length`` (< max_length), never dropped.
An empty response is kept: with EOS it is the EOS token alone; with no tokens at all it has
log-prob 0 over 0 tokens (the losses stay finite). Malformed rows raise ``DataError`` listing each
row index and field; nothing is dropped silently.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from alignkit.ops.options import is_real

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "tool", "function_call": "assistant"}


class DataError(ValueError):
    """The dataset cannot be used as given; the message names rows and fields."""


@dataclass(frozen=True)
class Example:
    """One tokenised training example. Pairs: responses = (chosen, rejected). KTO: responses =
    (completion,) and ``desirable`` set."""
    prompt: tuple
    responses: tuple
    desirable: Optional[bool] = None
    margin: Optional[float] = None        # reward models: Llama 2's per-pair margin


def load_rows(source) -> list:
    """A .json (list of rows) / .jsonl path, a datasets.Dataset, or a list of dicts."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise DataError(f"data file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                if path.endswith(".jsonl"):
                    rows = []
                    for i, line in enumerate(f):
                        if line.strip():
                            try:
                                rows.append(json.loads(line))
                            except json.JSONDecodeError as e:
                                raise DataError(f"{path}: line {i + 1} is not JSON ({e})") \
                                    from None
                else:
                    try:
                        rows = json.load(f)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path} is not JSON ({e}); use .jsonl for one row a "
                                        "line") from None
        except UnicodeDecodeError as e:       # a binary file (a pickle, parquet) given as rows
            raise DataError(f"{path} is not JSON: not UTF-8 text ({e.reason} at byte "
                            f"{e.start}); give .json or .jsonl rows") from None
        if not isinstance(rows, list):
            raise DataError(f"{path} must hold a JSON list of rows")
        return rows
    if hasattr(source, "to_list"):              # datasets.Dataset
        return source.to_list()
    if isinstance(source, list):
        return source
    raise DataError(f"data must be a path, a datasets.Dataset or a list of dicts; got "
                    f"{type(source).__name__}")


def detect_format(row: dict) -> str:
    if not isinstance(row, dict):
        return "?"
    if "conversations" in row:
        return "sharegpt"
    if "label" in row:
        return "kto"
    if "chosen" in row and "rejected" in row:
        return "messages" if isinstance(row["chosen"], list) else "pairs"
    if "responses" in row:
        return "ranked"
    if "messages" in row or ("prompt" in row and "completion" in row):
        return "sft"
    return "?"


def _is_msgs(x):
    return isinstance(x, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in x)


def normalise(row, fmt: str):
    """Row -> (prompt messages, [response message, ...], desirable) or raises KeyError/TypeError
    with the offending field's name."""
    if not isinstance(row, dict):
        raise TypeError("row: not a JSON object")
    if fmt == "pairs":
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(k), str):
                raise TypeError(f"{k}: missing or not a string")
        p = [{"role": "user", "content": row["prompt"]}]
        return p, [{"role": "assistant", "content": row[k]} for k in ("chosen", "rejected")], None
    if fmt == "messages":
        for k in ("chosen", "rejected"):
            if not _is_msgs(row.get(k)) or not row[k]:
                raise TypeError(f"{k}: missing or not a list of {{role, content}} messages")
        if "prompt" in row:
            if not _is_msgs(row["prompt"]) or not row["prompt"]:
                raise TypeError("prompt: not a non-empty list of {role, content} messages")
            prompt, c, r = row["prompt"], row["chosen"], row["rejected"]
        else:                                  # implicit prompt: the common leading messages
            n = 0
            while n < min(len(row["chosen"]), len(row["rejected"])) - 1 and \
                    row["chosen"][n] == row["rejected"][n]:
                n += 1
            if n == 0:
                raise TypeError("prompt: missing, and chosen/rejected share no leading messages")
            prompt, c, r = row["chosen"][:n], row["chosen"][n:], row["rejected"][n:]
        for k, resp in (("chosen", c), ("rejected", r)):
            if len(resp) != 1 or resp[0]["role"] != "assistant":
                raise TypeError(f"{k}: the response must be one assistant message")
        return prompt, [c[0], r[0]], None
    if fmt == "sharegpt":
        conv = row.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise TypeError("conversations: missing or not a non-empty list")
        prompt = []
        for j, m in enumerate(conv):
            if not isinstance(m, dict) or m.get("from") not in _SHAREGPT_ROLES or \
                    not isinstance(m.get("value"), str):
                raise TypeError(f"conversations[{j}]: needs 'from' in "
                                f"{sorted(_SHAREGPT_ROLES)} and a string 'value'")
            prompt.append({"role": _SHAREGPT_ROLES[m["from"]], "content": m["value"]})
        resps = []
        for k in ("chosen", "rejected"):
            m = row.get(k)
            if not isinstance(m, dict) or not isinstance(m.get("value"), str):
                raise TypeError(f"{k}: missing or not a {{from, value}} message")
            resps.append({"role": "assistant", "content": m["value"]})
        return prompt, resps, None
    if fmt == "kto":
        label = row.get("label")
        if not isinstance(label, bool):
            raise TypeError("label: missing or not a boolean")
        return (*_one_response(row), label)
    if fmt == "ranked":
        resps = row.get("responses")
        if not isinstance(resps, list) or len(resps) < 2:
            raise TypeError("responses: missing or not a list of >= 2 responses (best first)")
        return prompt_of(row), [_response(f"responses[{j}]", m) for j, m in
                                 enumerate(resps)], None
    if fmt == "sft":
        return (*_one_response(row), None)
    raise TypeError(f"row: unknown data_format {fmt!r}")


def _one_response(row) -> tuple:
    """(prompt messages, [response]) of {"messages": [..., assistant]} or {"prompt", "completion"}
    (strings or messages): the KTO and SFT rows."""
    if "messages" in row:
        msgs = row["messages"]
        if not _is_msgs(msgs) or len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise TypeError("messages: needs a list of {role, content} messages ending with an "
                            "assistant message")
        return msgs[:-1], [msgs[-1]]
    return prompt_of(row), [_response("completion", row.get("completion"))]


def prompt_of(row) -> list:
    """A row's prompt as messages: a string, or a non-empty list of {role, content}."""
    p = row.get("prompt")
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    if _is_msgs(p) and p:
        return p
    raise TypeError("prompt: missing, or not a string or a non-empty list of {role, content} "
                    "messages")


def _response(name, m) -> dict:
    if isinstance(m, str):
        return {"role": "assistant", "content": m}
    if isinstance(m, list) and len(m) == 1:
        m = m[0]
    if _is_msgs([m]) and m["role"] == "assistant":
        return m
    raise TypeError(f"{name}: not a string or one assistant {{role, content}} message")


class Tokenise:
    """Messages -> token ids under one set of settings (part of the reference cache key)."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, append_eos: bool):
        self.tok = tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.append_eos = append_eos
        self.template = getattr(tokenizer, "chat_template", None) is not None

    def settings(self) -> dict:
        return dict(max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                    append_eos=self.append_eos, template=self.template,
                    tokenizer=type(self.tok).__name__, vocab=len(self.tok))

    def _ids(self, text):
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _prompt(self, prompt_msgs) -> list:
        tok = self.tok
        if self.template:
            return list(_as_ids(tok.apply_chat_template(prompt_msgs, add_generation_prompt=True,
                                                         tokenize=True)))
        text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt_msgs) + "assistant: "
        return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + self._ids(text)

    def prompt(self, prompt_msgs) -> tuple:
        """The prompt's ids alone (what a policy generates from), truncated as in __call__."""
        p = self._prompt(prompt_msgs)
        if not p:
            raise TypeError("prompt: tokenises to nothing and the tokenizer has no BOS token")
        return tuple(p[-self.max_prompt_length:])

    def __call__(self, prompt_msgs, resp_msg):
        tok = self.tok
        p = self._prompt(prompt_msgs)
        if self.template:
            full = list(_as_ids(tok.apply_chat_template(prompt_msgs + [resp_msg], tokenize=True)))
            if full[:len(p)] != p:
                raise TypeError("chat template: the prompt's tokens are not a prefix of the "
                                "conversation's (the template rewrites earlier turns)")
            r = full[len(p):]
        else:
            r = self._ids(resp_msg["content"])
            if self.append_eos and tok.eos_token_id is not None:
                r = r + [tok.eos_token_id]
        if not p:
            raise TypeError("prompt: tokenises to nothing and the tokenizer has no BOS token, "
                            "so the first response token has no position to be predicted from")
        p = p[-self.max_prompt_length:]
        r = r[:self.max_length - len(p)]
        return tuple(p), tuple(r)


def _as_ids(x):
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return x


# the row shapes each loss reads (others: the paired ones)
_READS = {"kto": ("kto",), "reward": ("pairs", "messages", "sharegpt", "ranked"),
          "sft": ("sft", "pairs", "messages", "sharegpt")}
_PAIRS = ("pairs", "messages", "sharegpt")


def tokenise_rows(rows: Sequence, tokenise: Tokenise, data_format: str = "auto",
                  loss: str = "dpo", where: str = "data") -> list:
    """Rows -> [Example]; every malformed row is reported (index and field) in one DataError."""
    if not rows:
        raise DataError(f"{where}: no rows")
    fmt = detect_format(rows[0]) if data_format == "auto" else data_format
    if fmt == "?":
        raise DataError(f"{where}: row 0 has keys {sorted(rows[0]) if isinstance(rows[0], dict) else rows[0]!r}, "
                        "which match no known shape (prompt/chosen/rejected, conversations, "
                        "messages + label); set data_format")
    reads = _READS.get(loss, _PAIRS)
    if fmt not in reads:
        readers = sorted(k for k, v in _READS.items() if fmt in v) + \
            (["the preference losses"] if fmt in _PAIRS else [])
        raise DataError(f"{where}: rows are {fmt!r}-shaped but loss {loss!r} reads "
                        f"{', '.join(reads)} rows ({fmt!r} rows are for "
                        f"{', '.join(readers) or 'no loss'})")
    margins = [isinstance(r, dict) and "margin" in r for r in rows] if loss == "reward" else []
    if any(margins) and not all(margins):
        raise DataError(f"{where}: {sum(margins)} of {len(rows)} rows have a margin; give one on "
                        f"every row or on none (first without: row {margins.index(False)})")
    out, bad = [], []
    for i, row in enumerate(rows):
        try:
            prompt, resps, desirable = normalise(row, fmt)
            if loss == "sft":
                resps = resps[:1]                 # pairs rows: the chosen response
            margin = row["margin"] if any(margins) else None
            if margin is not None and not is_real(margin):
                raise TypeError(f"margin: not a finite number ({margin!r})")
            toks = [tokenise(prompt, m) for m in resps]
        except (TypeError, KeyError) as e:
            bad.append(f"row {i}: {e}")
            continue
        out.append(Example(toks[0][0], tuple(t[1] for t in toks), desirable,
                           None if margin is None else float(margin)))
    if bad:
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(f"{where}: {len(bad)} malformed row(s) of {len(rows)} ({fmt} format):\n  "
                        + "\n  ".join(bad[:20]) + more)
    return out


def examples_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.responses, ex.desirable]).encode())
    return h.hexdigest()
