import os

import pytest
import torch

import alignkit

BACKENDS = ["torch"] + (["cpp"] if alignkit.cpp_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_oracle(name, ours, ref64, naive, factor=4.0):
    """Tolerance relative to torch's own error: |ours − ref64| ≤ factor·|naive − ref64| + floor.

    `naive` is the plain-torch computation in the same dtype as `ours` (full logits, log_softmax),
    `ref64` the float64 oracle. The floor (a few fp32 ulps of the values' scale) only matters where
    torch happens to be exact.
    """
    e_ours, e_torch = max_err(ours, ref64), max_err(naive, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    floor = 8 * torch.finfo(torch.float32).eps * max(scale, 1.0)
    assert e_ours <= factor * e_torch + floor, (
        f"{name}: error {e_ours:.3e} vs torch's own {e_torch:.3e} (floor {floor:.1e})")


def make_inputs(shape, H, V, *, dtype=torch.float32, bias=False, ignore_frac=0.25, scale=1.0,
                seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * (scale / H**0.5) * 3
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -100
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(h), cast(W), cast(b), y


def shared_data_dir():
    """../shared/data next to the repo (LLaMA-Factory demo sets), or $ALIGNKIT_DATA_DIR."""
    import os
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in (os.environ.get("ALIGNKIT_DATA_DIR"), os.path.join(here, "..", "shared", "data"),
              "/work/shared/data"):
        if d and os.path.isfile(os.path.join(d, "dpo_en_demo.json")):
            return d
    raise FileNotFoundError("the preference demo data (dpo_en_demo.json) is not in ../shared/data;"
                            " set ALIGNKIT_DATA_DIR")


@pytest.fixture(scope="session")
def data_dir():
    return shared_data_dir()


@pytest.fixture(scope="session")
def bpe_tokenizer(data_dir, tmp_path_factory):
    """A byte-level BPE with a chat template, trained here on the demo data (about 3 s)."""
    import json
    import os
    from alignkit.train.tokenizer import texts_of, train_bpe
    rows = []
    for f in ("dpo_en_demo.json", "dpo_zh_demo.json", "kto_en_demo.json"):
        with open(os.path.join(data_dir, f)) as fh:
            rows += json.load(fh)
    out = str(tmp_path_factory.mktemp("bpe"))
    train_bpe(texts_of(rows), 4000, out)
    return out


@pytest.fixture(scope="module")
def tok(bpe_tokenizer):
    """The BPE above as a transformers tokenizer, one per test module (trainers may set its
    padding side or template)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(bpe_tokenizer)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of alignkit's head ops that the drop-ins route through (the fused
    forward of alignkit.integrations.head; each call's op name is recorded): a drop-in test
    asserts they ran, so that it fails if the trainer stops routing through the patched head."""
    import alignkit.integrations.head as head
    calls = []

    def counting(real):
        def counted(*a, **k):
            calls.append(real.__name__)
            return real(*a, **k)
        return counted
    # per-token fields (TRL's fused_lm_head call, patch_model) and the fused preference loss
    for name in ("linear_logprobs_stats", "preference_loss", "sft_loss_tokens"):
        monkeypatch.setattr(head, name, counting(getattr(head, name)))
    return calls


@pytest.fixture
def kept_rows(monkeypatch):
    """The rows of G each single pass kept for its deferred tokens (one entry per
    VocabTiles.finish_kept call): a keep-budget test asserts them, so it fails if the kept path
    did not run, or kept another number of rows."""
    from alignkit.ops.vocab_tiles import VocabTiles
    kept = []
    real = VocabTiles.finish_kept
    monkeypatch.setattr(VocabTiles, "finish_kept",
                        lambda self, sel, scale: kept.append(sel.numel()) or real(self, sel, scale))
    return kept


# The Triton tests (test_triton_interpreter.py, test_triton_single_pass.py) run where the tensors
# are: CPU tensors under the interpreter (TRITON_INTERPRET=1: it would copy CUDA ones to the
# host), CUDA tensors on a card. Elsewhere they skip (triton_devices).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICES = ["cpu"] if TRITON_INTERPRET else (["cuda"] if torch.cuda.is_available() else [])
triton_devices = pytest.mark.skipif(not TRITON_DEVICES, reason="run with TRITON_INTERPRET=1 "
                                    "(make test does) or on a CUDA device (make gpu-check)")


@pytest.fixture(params=TRITON_DEVICES or ["cpu"])
def device(request):
    """Each device the Triton tests run on here (TRITON_DEVICES)."""
    return torch.device(request.param)


def on(device, *ts):
    """The tensors on `device`; leaves that required grad stay leaves that do."""
    return tuple(None if t is None else
                 t.detach().to(device).requires_grad_(t.requires_grad) for t in ts)


# The plan chooser (alignkit/ops/plan.py) in tests: the cost model with fixed machine constants
# (ALIGNKIT_AUTOTUNE=0, no timing of candidates) and a plan cache of the session's own, so every
# machine picks the same plans. Session-wide, so that module-scoped fixtures (a trainer run shared
# by a module's tests) see it too; the constants are in the cache file as well, for the tests'
# subprocesses (alignkit train, ranks): one plan per key whichever process decides it, so resumed
# runs stay bit-identical. The chooser's own tests (test_plan.py) time candidates in a cache of
# each test's own.
TEST_MACHINE = {"gemm": 1e11, "bandwidth": 2e10}


@pytest.fixture(scope="session", autouse=True)
def plan_environment(tmp_path_factory):
    from alignkit.ops import plan
    mp = pytest.MonkeyPatch()
    mp.setenv("ALIGNKIT_PLAN_CACHE", str(tmp_path_factory.mktemp("plans")))
    mp.setenv("ALIGNKIT_AUTOTUNE", "0")
    mp.setattr(plan, "machine_constants", lambda device, dtype: TEST_MACHINE)
    plan._write_disk({f"machine|{plan.machine_id('cpu')}|{dt}": TEST_MACHINE
                      for dt in ("float32", "bfloat16", "float16")})
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def plan_chooser(plan_environment):
    from alignkit.ops import plan, plan_store
    plan.forget()
    yield plan
    plan.forget()
    plan_store.read_disk_plans(True)      # a bench run in a test (use_plan_cache) turned it off
