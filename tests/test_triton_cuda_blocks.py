"""The Triton kernels at the blocks a card launches them with (triton_path's CUDA_LOWP,
CUDA_LOWP_BWD, CUDA_FP32; bench.gpu_compile sized them), against the float64 oracle. Under the
interpreter the launcher would pick its own small blocks: here schedule() is made to return the
CUDA ones, on a shape smaller and odder than every block (37 rows in a 128-row block, V=300 over
ragged 128- and 64-wide vocab blocks, H=80 not a multiple of BLOCK_K 64 or 32: every mask path).
On a card they are the blocks it uses anyway."""
import pytest
import torch

from conftest import make_inputs, on, triton_devices
from test_linear_logprobs import check_all

pytestmark = triton_devices
triton = pytest.importorskip("triton")


@pytest.fixture
def cuda_blocks(monkeypatch):
    from alignkit.ops import triton_path as T

    def schedule(h, backward=False):
        return (T.CUDA_FP32 if h.dtype == torch.float32 else
                T.CUDA_LOWP_BWD if backward else T.CUDA_LOWP)
    monkeypatch.setattr(T, "schedule", schedule)
    monkeypatch.delenv("ALIGNKIT_TRITON_BLOCKS", raising=False)
    return T


@pytest.mark.parametrize("mode", ["chunked", "atomic", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_blocks_against_oracle(cuda_blocks, monkeypatch, mode, dtype, device):
    monkeypatch.setenv("ALIGNKIT_TRITON_BWD", mode)
    h, W, b, y = make_inputs((37,), 80, 300, dtype=dtype, bias=True, seed=61)
    y[:4] = -100
    check_all(*on(device, h, W, b, y), "triton", softcap=5.0, temperature=0.9,
              factor=2.0 if dtype != torch.float32 else 4.0)


def test_cuda_blocks_are_what_the_kernels_see(cuda_blocks):
    # the tiles above are the launcher's: forward 128 x 128, backward 128 x 64 in bf16/fp16
    T = cuda_blocks
    assert (T.CUDA_LOWP.block_n, T.CUDA_LOWP.block_v) == (128, 128)
    assert (T.CUDA_LOWP_BWD.block_n, T.CUDA_LOWP_BWD.block_v) == (128, 64)
    assert T.CUDA_FP32.num_warps == 8
