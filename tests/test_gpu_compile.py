"""bench.gpu_compile's failure rules on a tiny synthetic report (no compiler involved): each rule
fires on the row that breaks it, and a clean report passes. Also the occupancy arithmetic and the
pruner / opt-in refusal that use the same limits."""
import pytest

from alignkit.ops import gpu_limits as L
from bench.gpu_compile import check, mma_class

SCHED = (128, 128, 64, 8, 8, 3)


def row(**kw):
    r = dict(kernel="_fwd_partials", arch="sm_90a", dtype="bf16", precision="native",
             role="default", variant="plain", sched=SCHED, regs=180, stack=0, local=0,
             shared=99328, mma="HGMMA", smem_estimate=L.pipeline_smem(128, 128, 64, 3, 2, 90))
    r.update(kw)
    return r


def test_clean_report_passes():
    assert check([row(), row(arch="sm_80", mma="HMMA", shared=65536),
                  row(kernel="_logits_fwd", sched=(), mma="FFMA", shared=1040,
                      smem_estimate=None)]) == []


def test_spill_in_default_path_fails():
    bad = check([row(stack=176)])
    assert len(bad) == 1 and "spills (176 B stack" in bad[0]
    assert check([row(local=8)]) and check([row(kernel="_logits_bwd", stack=8)])


def test_spill_outside_default_path_is_reported_not_failed():
    assert check([row(kernel="_bwd_dw", role="opt-in", stack=1240, smem_estimate=None)]) == []


def test_block_over_shared_memory_fails_unless_refused():
    over = L.ARCHS["sm_90a"].smem_block + 1
    # the launcher would pick it: the estimate says it fits, the cubin says it does not
    bad = check([row(shared=over, smem_estimate=over - 2048)])
    assert any("over sm_90a's" in b for b in bad)
    assert any("estimate" in b for b in bad)
    # an autotune config the pruner drops / an opt-in mode the launcher refuses: no failure
    assert check([row(role="autotune", shared=over, smem_estimate=over)]) == []
    assert check([row(kernel="_bwd_atomic", role="opt-in", shared=over,
                      smem_estimate=None)]) == []
    # a default schedule is never refused
    assert any("over" in b for b in check([row(shared=over, smem_estimate=over)]))


def test_missing_tensor_core_instruction_fails():
    bad = check([row(mma="HMMA")])              # sm_90a: HGMMA expected
    assert len(bad) == 1 and "no tensor-core instruction" in bad[0]
    assert check([row(arch="sm_80", mma="FFMA", shared=65536)])
    assert check([row(dtype="fp16", mma="FFMA")])
    # fp32 with ieee products runs on the CUDA cores by design
    assert check([row(dtype="fp32", precision="ieee", mma="FFMA", shared=50176,
                      smem_estimate=L.pipeline_smem(64, 128, 32, 3, 4, 90, mma=False))]) == []


def test_compile_error_fails():
    bad = check([{k: v for k, v in row().items() if k in ("kernel", "arch", "dtype", "precision",
                                                             "role", "variant", "sched")}
                 | {"error": "CompilationError: boom"}])
    assert bad == [bad[0]] and "does not compile" in bad[0]


def test_mma_class_reads_opcodes():
    assert mma_class({"HGMMA": 4, "HMMA": 1}) == "HGMMA"
    assert mma_class({"UTCHMMA": 2}) == "UTCMMA"
    assert mma_class({"HMMA": 8}) == "HMMA"
    assert mma_class({"FFMA": 900}) == "FFMA"


def test_blocks_per_sm():
    h100 = L.ARCHS["sm_90a"]
    assert L.blocks_per_sm(h100, 255, 8, 99328) == {"blocks": 1, "limit": "registers",
                                                     "warps": 8}
    assert L.blocks_per_sm(h100, 128, 8, 99328)["blocks"] == 2
    assert L.blocks_per_sm(h100, 32, 4, 0)["blocks"] == 16          # threads: 2048 / 128
    assert L.blocks_per_sm(h100, 128, 8, h100.smem_block + 1)["blocks"] == 0


def test_estimate_below_compiled_fails():
    bad = check([row(role="autotune", smem_estimate=90000)])
    assert len(bad) == 1 and "estimate" in bad[0]


def test_refusal_names_mode_and_arch():
    with pytest.raises(L.DoesNotFit, match=r"ALIGNKIT_TRITON_BWD=atomic.*sm_90a"):
        L.check_fits("ALIGNKIT_TRITON_BWD=atomic (_bwd_atomic)", "sm_90a (H100)",
                     272 * L.KIB, L.ARCHS["sm_90a"].smem_block)
    L.check_fits("ALIGNKIT_TRITON_BWD=atomic", "sm_90a", 160 * L.KIB, L.ARCHS["sm_90a"].smem_block)


def test_pipeline_estimate_matches_compiled_sizes():
    # figures read from cubins (bench.gpu_compile, triton 3.9): sm_80 keeps num_stages - 1
    # buffers, sm_90a num_stages and 1 KiB of barriers
    assert L.pipeline_smem(128, 128, 64, 3, 2, 80) == 65536
    assert L.pipeline_smem(128, 128, 64, 3, 2, 90) == 99328
    assert L.pipeline_smem(128, 128, 64, 4, 4, 80) == 196608
    assert L.pipeline_smem(128, 128, 64, 3, 2, 100) == 99344
    # fp32 "ieee" products (no tensor-core dot): num_stages - 1 buffers on sm_90a / sm_100a too
    assert L.pipeline_smem(64, 128, 32, 3, 4, 90, mma=False) == 50176
    assert L.pipeline_smem(128, 128, 64, 4, 4, 100, mma=False) == 197632


def test_pruner_keeps_only_configs_that_fit():
    import triton
    cfgs = [triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_stages=s)
            for s in (3, 8)]
    keep = [c for c in cfgs if L.fits_config(c.kwargs, c.num_stages, 2, 80,
                                             L.ARCHS["sm_80"].smem_block)]
    assert [c.num_stages for c in keep] == [3]
    # off a card (the interpreter) nothing is pruned
    import torch
    assert L.prune_configs(cfgs, {"h_ptr": torch.zeros(1)}) == cfgs


class _FakeKernel:
    """A kernel whose compile (warmup) reports `shared` bytes: refuse_unfit's view of one."""
    __name__ = "_bwd_atomic"

    def __init__(self, shared):
        self.shared, self.launched = shared, False

    def warmup(self, *args, grid, **kw):
        import types
        return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=self.shared))


def test_launcher_refuses_an_opt_in_mode_that_does_not_fit(monkeypatch):
    # triton_path.refuse_unfit compiles the launch and compares its shared memory with the
    # card's limit before anything runs: 272 KiB (_bwd_atomic at 128 x 256 x 64 in bf16) on an
    # H100's 227 KiB is refused with the mode and the architecture named; 121 KiB passes
    import torch
    from alignkit.ops import triton_path as T
    monkeypatch.setattr(L, "device_arch", lambda dev: ("sm_90a (H100)", 90, 227 * L.KIB))
    kw = dict(BLOCK_N=128, BLOCK_V=256, BLOCK_K=64, num_stages=3)
    h = torch.zeros(2, 2, dtype=torch.bfloat16)
    with pytest.raises(L.DoesNotFit, match=r"ALIGNKIT_TRITON_BWD=atomic \(_bwd_atomic.*sm_90a"):
        T.refuse_unfit("ALIGNKIT_TRITON_BWD=atomic", _FakeKernel(272 * L.KIB), (1,), (), kw, h)
    T.refuse_unfit("ALIGNKIT_TRITON_BWD=atomic", _FakeKernel(121 * L.KIB), (1,), (), kw, h)
