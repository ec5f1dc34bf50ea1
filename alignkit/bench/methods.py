"""The implementations every benchmark compares (bench.core, bench.losses, bench.rl, the
pytest-benchmark suite and ``alignkit bench``), each as ``setup(case) -> step``: one forward +
backward on the case's inputs, from fresh gradients.

Three objectives, the same math for every method, only the head differs:
    logprobs  seq_s = Σ_t log p(y_t | h_t); loss = −mean log σ(β·((seq_c − ref_c) − (seq_r −
              ref_r))) for pairs (first half chosen), −mean log σ(β·(seq_s − ref_s)) otherwise
    dpo / simpo / orpo   alignkit.losses' math on the per-sequence sums (Liger: its own classes)
    policy types         alignkit.losses.policy.policy_loss_from_logprobs on per-token log-probs
Peers give per-token log-probs (naive full logits, TRL's ChunkedLogProbFunction, torch's chunked
F.linear_cross_entropy, CCE) and the shared math does the rest; Liger's fused classes compute
their own loss. ``steps_for`` builds a loss's side-by-side set, peers that are not installed
reported with the pip name that adds them.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import alignkit
from alignkit.bench import sft as sft_bench
from alignkit.losses import dpo_loss, orpo_loss, simpo_loss
from alignkit.losses.policy import POLICY_LOSS_TYPES, policy_loss_from_logprobs
from alignkit.ops.options import PLANS


@dataclass
class Case:
    name: str
    S: int
    T: int
    H: int
    V: int
    h: torch.Tensor       # [S, T, H] requires grad
    W: torch.Tensor       # [V, H] requires grad
    y: torch.Tensor       # [S, T], first 25% of each row = -100 (masked prompt)
    ref: torch.Tensor     # [S] reference sequence log-probs
    beta: float = 0.1

    @property
    def mask(self):
        return self.y != -100

    @property
    def grads_mib(self) -> float:
        """The memory floor: grad_W + grad_h in the inputs' dtype."""
        return (self.V * self.H + self.S * self.T * self.H) * self.h.element_size() / 2**20

    def reset(self):
        """Drops the gradients of the last run, outside any timed or profiled region (a free of
        a tensor allocated before profiling starts would be counted with an unknown size)."""
        self.h.grad = self.W.grad = None


def case_as(case: Case, dtype) -> Case:
    """The same inputs in another dtype (fresh leaves)."""
    return Case(case.name, case.S, case.T, case.H, case.V,
                case.h.detach().to(dtype).requires_grad_(),
                case.W.detach().to(dtype).requires_grad_(), case.y, case.ref, case.beta)


def make_case(name, S, T, H, V, seed=0, prompt_fraction: float = 0.25) -> Case:
    # each shape's compiled peers (CCE torch_compile, Liger compiled) compile afresh, as for a
    # user who runs one shape: carried over, the second shape recompiled them with dynamic
    # shapes, and Liger's compiled GRPO loss failed in dynamo at R3 after R2
    # ("sources must not be empty for symbol"), on the AVX2 EPYC
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(S, T, H, generator=g).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    y = torch.randint(0, V, (S, T), generator=g)
    y[:, : int(T * prompt_fraction)] = -100
    ref = torch.randn(S, generator=g) * 10 - T * 5
    return Case(name, S, T, H, V, h, W, y, ref)


def seq_loss(seq, case: Case):
    d = seq - case.ref
    if case.S % 2 == 0:
        B = case.S // 2
        d = d[:B] - d[B:]
    return -F.logsigmoid(case.beta * d).mean()


def _step(case: Case, token_lp_fn):
    def step():
        lp = token_lp_fn()
        seq_loss(lp.reshape(case.S, case.T).sum(-1), case).backward()
    return step


# ------------------------------------------------------------------------------------- methods
def floor(case: Case):
    """The three GEMMs no fused loss avoids, over the labelled tokens only: h·Wᵀ, G·W, Gᵀ·h."""
    hs = case.h.detach()[case.mask]
    W = case.W.detach()
    G = torch.randn(hs.shape[0], case.V, dtype=hs.dtype)   # the case's dtype: bf16 has its own

    def step():
        torch.mm(hs, W.t())
        torch.mm(G, W)
        torch.mm(G.t(), hs)
    return step


def one_gemm(case: Case):
    hs = case.h.detach()[case.mask]
    W = case.W.detach()
    return lambda: torch.mm(hs, W.t())


def alignkit_op(backend):
    def setup(case: Case):
        return _step(case, lambda: alignkit.linear_token_logprobs(case.h, case.W, case.y,
                                                                  backend=backend))
    return setup


def alignkit_nograd(case: Case):
    h, W = case.h.detach(), case.W.detach()

    def step():
        with torch.no_grad():
            alignkit.linear_token_logprobs(h, W, case.y)
    return step


# ------------------------------------------------------------------ preference losses (bench.losses)
PREFERENCE = ("dpo", "simpo", "orpo")


def _loss_from_seq(loss, sums, counts, case):
    B = case.S // 2
    counts = counts.to(sums.dtype)
    avg = sums / counts.clamp(min=1)
    if loss == "dpo":
        return dpo_loss(sums[:B], sums[B:], case.ref[:B], case.ref[B:])[0]
    if loss == "simpo":
        return simpo_loss(avg[:B], avg[B:])[0]
    nll = -sums[:B].sum() / counts[:B].sum().clamp(min=1)
    return orpo_loss(avg[:B], avg[B:], nll=nll)[0]


def plan_cache_flag(p):
    """--cached-plans on a bench's parser (alignkit bench, bench.losses, bench.rl); use_plan_cache
    applies it."""
    p.add_argument("--cached-plans", action="store_true",
                   help="let auto take the plans the disk cache decided before (what a user's "
                        "later runs do); default: auto measures afresh, as on a first run, and "
                        "its fresh choice replaces the cached one")


def use_plan_cache(on: bool):
    """A bench times what auto decides now, not what some earlier process cached (a decision
    measured while another process took the cores would sit in every later table)."""
    from alignkit.ops import plan_store
    plan_store.read_disk_plans(on)


# what the plan chooser took for each alignkit row of the last steps_for (alignkit bench prints it)
CHOSEN: dict = {}


def settled(name, step):
    """Runs an alignkit step until the plan chooser has decided its plan (the first calls of a
    new plan key are its tuning calls), so that the bench times the steady state; records the
    choice in CHOSEN[name]. Returns the step."""
    from alignkit.ops import plan
    for _ in range(2 * len(PLANS) * plan.ROUNDS + 1):
        step()
        if plan.LAST and plan.LAST[0].how not in ("tuning", "measured"):
            break
    CHOSEN[name] = plan.LAST[0] if plan.LAST else None
    return step


def alignkit_fused(loss, grad_mode="auto", backend="auto", tiles=None, name="alignkit"):
    def setup(case):
        kw = dict(ref_logprobs=case.ref) if loss == "dpo" else {}
        return settled(name, lambda: alignkit.preference_loss(
            case.h, case.W, case.y, loss=loss, grad_mode=grad_mode, backend=backend, tiles=tiles,
            **kw)[0].backward())
    return setup


def plan_steps(case, loss=None, policy_kw=None, memory=None):
    """alignkit's default (auto, at the memory option given, and at memory="fast") beside every
    plan of the chooser, pinned (at memory="fast", so that each can run): the rows that show how
    far auto sits from the best candidate (bench.losses --plans, bench.rl). A plan that adds
    nothing at this shape (fast = the single pass) runs once, under its own name."""
    T = alignkit.TileOptions

    def one(name, tiles):
        if policy_kw is not None:
            return alignkit_policy(policy_kw, "auto", tiles=tiles, name=name)(case)
        return alignkit_fused(loss, "auto", tiles=tiles, name=name)(case)
    steps = {"alignkit auto": one("alignkit auto", T(memory=memory))}
    if memory != "fast":
        steps["alignkit auto, memory=fast"] = one("alignkit auto, memory=fast", T(memory="fast"))
    for p in PLANS:
        steps[f"alignkit plan={p}"] = one(f"alignkit plan={p}", T(memory="fast", plan=p))
    return steps


def auto_against_plans(rows) -> list:
    """For the rows of one plan_steps measurement: (shape, plan auto chose, auto's time / floor,
    the best plan auto could take under its memory option and its time / floor, auto's gap to
    it): how far auto sits from the best feasible candidate."""
    c = CHOSEN.get("alignkit auto")
    by = {r.method: r for r in rows if r.seconds is not None}
    if c is None or "alignkit auto" not in by:
        return []
    feas = {p: by[f"alignkit plan={p}"] for p in c.feasible if f"alignkit plan={p}" in by}
    # by the ratio to the floor: the same as by seconds in interleaved rounds, and with --paired
    # the drift-free measure (each ratio the median of back-to-back (floor, step) pairs)
    best = min(feas, key=lambda p: feas[p].x_floor)
    auto = by["alignkit auto"]
    return [(auto.shape, c.plan, auto.x_floor, best, feas[best].x_floor,
             auto.x_floor / feas[best].x_floor - 1)]


def auto_table(summary) -> str:
    """auto_against_plans' rows as markdown."""
    head = ("| shape | auto chose | auto / floor | best feasible plan | its / floor | auto's gap |\n"
            "|---|---|---|---|---|---|\n")
    return head + "".join(f"| {s} | {p} | {a:.2f}x | {b} | {bx:.2f}x | {g:+.1%} |\n"
                          for s, p, a, b, bx, g in summary)


def liger_pref(loss, compiled):
    def setup(case):
        from liger_kernel.chunked_loss import (
            LigerFusedLinearDPOLoss,
            LigerFusedLinearORPOLoss,
            LigerFusedLinearSimPOLoss,
        )
        if loss == "dpo":
            fn = LigerFusedLinearDPOLoss(beta=0.1, compiled=compiled, use_ref_model=False)
        elif loss == "simpo":
            fn = LigerFusedLinearSimPOLoss(beta=2.0, gamma=1.0, compiled=compiled)
        else:
            fn = LigerFusedLinearORPOLoss(beta=0.1, compiled=compiled)
        return lambda: fn(case.W, case.h, case.y)[0].backward()
    return setup


# ------------------------------------------------------------------ policy losses (bench.rl)
def rl_inputs(case, seed=1):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(case.S, generator=g)
    old = -3 + 0.1 * torch.randn(case.S, case.T, generator=g)
    ref = -3 + 0.1 * torch.randn(case.S, case.T, generator=g)
    return adv, old, ref


def policy_terms_step(case, kw, lp_ent):
    """The policy loss on per-token log-probs [S, T] (and entropies) from lp_ent(), with
    policy_loss's own math."""
    adv, old, ref = rl_inputs(case)

    def step():
        lp, ent = lp_ent()
        policy_loss_from_logprobs(lp, ent, case.y, advantages=adv, old_logprobs=old,
                                  ref_logprobs=ref if kw.get("beta") else None,
                                  **kw)[0].backward()
    return step


def alignkit_policy(kw, grad_mode="auto", backend="auto", tiles=None, name="alignkit"):
    def setup(case):
        adv, old, ref = rl_inputs(case)
        extra = dict(ref_logprobs=ref) if kw.get("beta") else {}
        return settled(name, lambda: alignkit.policy_loss(
            case.h, case.W, case.y, advantages=adv, old_logprobs=old, grad_mode=grad_mode,
            backend=backend, tiles=tiles, **extra, **kw)[0].backward())
    return setup


def liger_grpo(kw, compiled):
    def setup(case):
        if kw.get("entropy_coef"):
            raise NotImplementedError("LigerFusedLinearGRPOLoss has no entropy bonus")
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        adv, old, ref = rl_inputs(case)
        beta = kw.get("beta", 0.0)
        fn = LigerFusedLinearGRPOLoss(beta=beta, compiled=compiled, use_ref_model=beta > 0,
                                      loss_type=kw["loss_type"], max_completion_length=case.T,
                                      importance_sampling_level=kw.get(
                                          "importance_sampling_level", "token"))
        mask = case.mask.long()
        y = case.y.clamp(min=0)
        return lambda: fn(case.h, case.W, y, mask, adv, ref_per_token_logps=ref if beta else None,
                          old_per_token_logps=old)[0].backward()
    return setup


# ------------------------------------------------------------------ per-token log-probs of peers
def _naive_lp(case, entropy=False):
    logp = torch.log_softmax((case.h @ case.W.t()).float(), -1)
    lp = logp.gather(-1, case.y.clamp(min=0)[..., None]).squeeze(-1) * case.mask
    return lp, (-(logp.exp() * logp).sum(-1) if entropy else None)


def _trl_lp(case, entropy=False):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as CHUNK
    outputs = ("entropy",) if entropy else ()
    out = ChunkedLogProbFunction.apply(case.h.reshape(-1, case.H), case.W, None,
                                       case.y.clamp(min=0).reshape(-1), 1.0, CHUNK, None, 1.0,
                                       outputs)
    lp = out[0].view(case.S, case.T).masked_fill(~case.mask, 0)
    return lp, (out[1].view(case.S, case.T) if entropy else None)


def _torch_lce_lp(case, entropy=False):
    if entropy:
        raise NotImplementedError("F.linear_cross_entropy gives no entropy")
    opts = torch.nn.LinearCrossEntropyOptions()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ce = F.linear_cross_entropy(case.h.reshape(-1, case.H), case.W, case.y.reshape(-1),
                                    reduction="none", ignore_index=-100, options=opts)
    return -ce.view(case.S, case.T), None


def _cce_lp(case, entropy=False):
    if entropy:
        raise NotImplementedError("cut-cross-entropy gives no entropy")
    from cut_cross_entropy import linear_cross_entropy
    return -linear_cross_entropy(case.h, case.W, case.y, reduction="none",
                                 impl="torch_compile"), None


# peer name -> (token log-probs, the import it needs, the pip name that adds it)
PEERS = {
    "naive full logits": (_naive_lp, None, None),
    "TRL ChunkedLogProbFunction": (_trl_lp, "trl", "trl"),
    "torch F.linear_cross_entropy chunked": (_torch_lce_lp, None, None),
    "CCE torch_compile": (_cce_lp, "cut_cross_entropy", "cut-cross-entropy"),
}
LIGER = ("liger_kernel", "liger-kernel")
LOSS_KINDS = ("logprobs", "sft") + PREFERENCE + POLICY_LOSS_TYPES + ("distill",)


def missing(module):
    return module is not None and importlib.util.find_spec(module) is None


def peer_step(name, loss, kw=None):
    """setup(case) of a peer's per-token log-probs under the loss's shared math."""
    lp_fn = PEERS[name][0]

    def setup(case):
        if loss == "logprobs":
            return _step(case, lambda: lp_fn(case)[0])
        if loss == "sft":
            return lambda: sft_bench.peer_loss(lp_fn(case)[0], case).backward()
        if loss in PREFERENCE:
            def step():
                lp = lp_fn(case)[0].reshape(case.S, case.T)
                _loss_from_seq(loss, lp.sum(-1), case.mask.sum(-1), case).backward()
            return step
        entropy = bool((kw or {}).get("entropy_coef"))
        return policy_terms_step(case, kw or {}, lambda: lp_fn(case, entropy))
    return setup


def steps_for(case, loss, grad_mode="auto", backend="auto", policy_kw=None, peers=None,
              tiles=None, plans=False):
    """(steps {name: step}, skipped {name: why}) for one loss kind on a case: the GEMM floor,
    alignkit's entry point, then every peer (a peer that is not installed is skipped, with the pip
    name that would add it; one that cannot serve the loss is skipped with the reason).
    peers: None for all, else the peers whose name holds one of these substrings
    (case-insensitive; [] for none). tiles: alignkit.TileOptions for alignkit's rows; plans: also
    one row per plan of the chooser, pinned (a plan the memory option refuses is skipped)."""
    CHOSEN.clear()
    from alignkit.bench.harness import FLOOR
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {', '.join(LOSS_KINDS)}, got {loss!r}")
    if loss == "distill":                # a teacher head beside the case's: its own set
        from alignkit.bench.distill import distill_steps
        return distill_steps(case, tiles=tiles, peers=peers)
    steps, skipped = {FLOOR: floor(case)}, {}
    kw = dict(loss_type=loss, **(policy_kw or {})) if loss in POLICY_LOSS_TYPES else None
    if loss == "logprobs":
        steps[f"alignkit ({backend})"] = alignkit_op(backend)(case)
    elif loss == "sft":
        steps.update(sft_bench.alignkit_steps(case, backend, tiles))
    elif loss in PREFERENCE:
        if case.S % 2:
            raise ValueError(f"loss {loss!r} needs pairs: an even number of sequences")
        n = f"alignkit preference_loss ({grad_mode})"
        steps[n] = alignkit_fused(loss, grad_mode, backend, tiles, n)(case)
    else:
        n = f"alignkit policy_loss ({grad_mode})"
        steps[n] = alignkit_policy(kw, grad_mode, backend, tiles, n)(case)
    if plans and loss not in ("logprobs", "sft"):
        # auto (the rows above) beside auto at memory="fast" and every plan, pinned
        more = plan_steps(case, loss if kw is None else None, kw,
                          memory=(tiles or alignkit.TileOptions()).memory)
        steps.update({k: v for k, v in more.items() if k != "alignkit auto"})
        CHOSEN["alignkit auto"] = CHOSEN.get(n)
    def wanted(name):
        return peers is None or any(x.lower() in name.lower() for x in peers)
    for name, (_, module, pip) in PEERS.items():
        if not wanted(name):
            continue
        if missing(module):
            skipped[name] = f"not installed: pip install {pip}"
            continue
        if name.startswith("torch F.linear") and not hasattr(F, "linear_cross_entropy"):
            skipped[name] = "this torch has no F.linear_cross_entropy (torch >= 2.13)"
            continue
        steps[name] = peer_step(name, loss, kw)(case)
    liger = None
    if loss in PREFERENCE:
        liger = lambda c: liger_pref(loss, c)  # noqa: E731
    elif kw is not None:
        liger = lambda c: liger_grpo(kw, c)  # noqa: E731
    elif loss == "sft":       # one Liger kernel (no compiled variant): the eager row
        liger = lambda c: None if c else sft_bench.liger_flce  # noqa: E731
    for compiled in (False, True):
        name = f"Liger fused ({'compiled' if compiled else 'eager'})"
        if not wanted(name):
            continue
        if liger is None:
            skipped[name] = "Liger has no fused per-token log-prob op"
        elif missing(LIGER[0]):
            skipped[name] = f"not installed: pip install {LIGER[1]}"
        else:
            try:
                setup = liger(compiled)
                if setup is None:
                    raise NotImplementedError("Liger's fused linear cross-entropy has no "
                                              "compiled variant")
                steps[name] = setup(case)
            except (NotImplementedError, ValueError) as e:
                skipped[name] = str(e)
    return steps, skipped


def liger_dpo(compiled: bool):
    """Liger's fused linear DPO loss for the core bench (pairs only: None on an odd number of
    sequences; no reference model, its own loss math)."""
    return lambda case: None if case.S % 2 else liger_pref("dpo", compiled)(case)


# bench.core's set: every peer's per-token log-probs under the same sequence loss
METHODS = {
    "naive full logits": peer_step("naive full logits", "logprobs"),
    "alignkit (auto)": alignkit_op("auto"),
    "alignkit (torch backend)": alignkit_op("torch"),
    "TRL ChunkedLogProbFunction": peer_step("TRL ChunkedLogProbFunction", "logprobs"),
    "torch F.linear_cross_entropy chunked": peer_step("torch F.linear_cross_entropy chunked",
                                                      "logprobs"),
    "Liger fused DPO (eager)": liger_dpo(False),
    "CCE torch_compile": peer_step("CCE torch_compile", "logprobs"),
}
