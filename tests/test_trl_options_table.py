"""The "TRL options" table of docs/dropins.md: generated from alignkit/losses/trl_options.py, complete
against the installed TRL 1.16's config dataclasses, and each refused option refused at the call
with its reason."""
import dataclasses
import os

import pytest
import torch

from alignkit.losses.trl_options import NOT_LOSS_SHAPING, OPTIONS, render

trl = pytest.importorskip("trl")
PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "dropins.md")


def _configs():
    import transformers
    from trl import DPOConfig, GRPOConfig, KTOConfig, RLOOConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig
    base = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    return {n: {f.name for f in dataclasses.fields(c)} - base for n, c in (
        ("GRPO", GRPOConfig), ("RLOO", RLOOConfig), ("DPO", DPOConfig), ("KTO", KTOConfig),
        ("CPO", CPOConfig), ("ORPO", ORPOConfig))}


def test_every_trl_field_is_classified_and_no_entry_is_stale():
    configs = _configs()
    other = {n for names in NOT_LOSS_SHAPING.values() for n in names}
    for cfg, fields in configs.items():
        listed = [o.name for o in OPTIONS if cfg in o.configs]
        assert len(listed) == len(set(listed)), f"{cfg}: an option listed twice"
        assert set(listed) <= fields, f"{cfg} has no field {set(listed) - fields}"
        missing = fields - set(listed) - other
        assert not missing, f"{cfg}Config fields in neither list: {sorted(missing)}"
    every = set().union(*configs.values())
    assert other <= every, f"NOT_LOSS_SHAPING names no TRL field: {sorted(other - every)}"


def test_dropins_page_table_is_the_rendered_one():
    text = open(PAGE, encoding="utf-8").read()
    start, end = "<!-- trl-options:start -->\n", "\n<!-- trl-options:end -->"
    assert start in text and end in text
    table = text[text.index(start) + len(start):text.index(end)]
    assert table == render()


def test_every_status_is_known():
    for o in OPTIONS:
        assert o.standalone in ("refused", "caller") or o.standalone.startswith("supported: `")
        assert o.dropin in ("supported", "refused")
        if not o.standalone.startswith("supported"):
            assert o.why, o.name                  # a refusal or a caller's note says why


def test_refused_options_raise_with_their_reason(monkeypatch):
    """Every option the list refuses for a paired loss raises with its reason; a planted
    refusal proves the wiring (today's list refuses none of DPO's, CPO's or ORPO's)."""
    from alignkit.losses import logprob_loss, trl_options
    from alignkit.losses.trl_options import Option
    planted = Option(("DPO",), "planted_option", "refused", "supported", "a planted reason")
    monkeypatch.setattr(trl_options, "OPTIONS", OPTIONS + (planted,))
    for o in trl_options.OPTIONS:
        if o.standalone != "refused":
            continue
        for cfg in o.configs:
            loss = {"DPO": "dpo", "CPO": "cpo", "ORPO": "orpo"}.get(cfg)
            if loss is None:
                continue
            z = torch.zeros(2)
            with pytest.raises(ValueError, match=f"option '{o.name}' .* refused .*"
                                                 f"{o.why[:30]}"):
                logprob_loss(z, torch.ones(2, dtype=torch.long), loss=loss,
                             ref_logprobs=z if loss == "dpo" else None, **{o.name: 0.5})
