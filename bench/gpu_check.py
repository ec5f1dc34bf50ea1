"""One prepared check for a lent GPU machine: ``make gpu-check`` (REPORT=path, DRY=1).

    python -m bench.gpu_check REPORT.md [--dry]

The lent machine (issue #20): Python 3.12, torch + CUDA, triton, transformers, pytest and
pytest-benchmark preinstalled, no network. The Makefile has already built alignkit in place
(``pip install --no-build-isolation --no-deps -e .``) and installed the peers' wheels from
``wheels/`` when they are there (``make gpu-wheels`` downloads them beforehand). This script then:

0. prints what the kernels compile to on the card it finds (bench.gpu_compile for its
   architecture: registers, spills, shared memory, blocks per SM, matrix instruction; the same
   report as ``make gpu-compile``), then times each default kernel's tile alone against its
   roofline, both ceilings measured on the card (bench.gpu_roofline, ``do_bench``);
1. runs the Triton tests on CUDA (tests/test_triton_*.py, no interpreter: the bf16
   tensor-core dot, the bf16 backward's out_dtype GEMMs, fp16, several G chunks, cuda:1 when
   there is one);
2. runs bench.gpu on two shapes (Llama-3-8B and Qwen2.5-7B heads, 8192 tokens, bf16);
3. writes a markdown report to REPORT: the machine, the test summary, the tables, the times.

``--dry`` (CI, any CPU): the same steps with TRITON_INTERPRET=1 and bench.gpu's dry shape; the
compile report for sm_90a limited to two small kernels (``make gpu-compile`` is the whole one),
the tiles launched once under the interpreter, untimed. Under 8 minutes on a card; exits non-zero
when the tests, the compile report or a launch fail.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

TESTS = ("tests/test_triton_interpreter.py", "tests/test_triton_single_pass.py",
         "tests/test_triton_cuda_blocks.py")


def _run(args, dry):
    """A python -m subprocess with TRITON_INTERPRET=1 in a dry run and unset on a card (set
    before triton is imported: a process of its own) -> (exit code, stdout, stderr, seconds)."""
    env = dict(os.environ)
    if dry:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    t = time.time()
    p = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr, time.time() - t


def _compile_report(dry, out_dir):
    """bench.gpu_compile for the card's architecture (sm_90a in a dry run, two small kernels):
    -> (exit code, markdown lines, seconds)."""
    if dry:
        arch, extra = "sm_90a", ["--kernel", "_fwd_merge", "_logits_fwd", "--jobs", "1"]
    else:
        import torch
        from alignkit.ops.gpu_limits import arch_of
        a = arch_of(torch.cuda.get_device_capability(0))
        if a is None:
            cap = torch.cuda.get_device_capability(0)
            return 0, [f"no compile table for sm_{cap[0]}{cap[1]} (alignkit.ops.gpu_limits.ARCHS "
                       "holds sm_80, sm_90a, sm_100a)"], 0.0
        arch, extra = a.name, ["--jobs", str(min(8, os.cpu_count() or 2))]
    rc, out, err, secs = _run(["bench.gpu_compile", "--arch", arch, "--out", out_dir, *extra],
                              False)
    md = os.path.join(out_dir, "gpu-compile.md")
    lines = open(md).read().splitlines()[2:] if os.path.exists(md) and rc in (0, 1) else \
        ["```"] + (out + err).strip().splitlines()[-40:] + ["```"]
    return rc, lines, secs


def _tiles(dry):
    rc, out, err, secs = _run(["bench.gpu_roofline"] + (["--dry"] if dry else []), dry)
    lines = out.strip().splitlines()
    if rc:
        lines += ["", "```"] + err.strip().splitlines()[-40:] + ["```"]
    return rc, lines, secs


def _tests(dry):
    rc, out, err, secs = _run(["pytest", "-q", "-W", "ignore::RuntimeWarning", "-p",
                               "no:cacheprovider", *TESTS], dry)
    return rc, (out + err).strip().splitlines(), secs


def _bench(dry):
    rc, out, err, secs = _run(["bench.gpu"] + (["--dry"] if dry else []), dry)
    lines = out.strip().splitlines()
    if rc:                               # the interpreter's numpy warnings are noise otherwise
        lines += ["", "```"] + err.strip().splitlines()[-40:] + ["```"]
    return rc, lines, secs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report")
    ap.add_argument("--dry", action="store_true")
    a = ap.parse_args(argv)
    import torch
    t0 = time.time()
    if not a.dry and not torch.cuda.is_available():
        print("gpu-check needs a CUDA device; on CPU run it with DRY=1", file=sys.stderr)
        return 2
    out_dir = os.path.join(os.path.dirname(os.path.abspath(a.report)), "gpu-check-compile")
    crc, compile_lines, t_compile = _compile_report(a.dry, out_dir)
    print("\n".join(["## What the kernels compile to on this card", ""] + compile_lines),
          flush=True)
    trc, tile_lines, t_tiles = _tiles(a.dry)
    print("\n".join(["", "## Each default kernel against its roofline", ""] + tile_lines),
          flush=True)
    rc, test_lines, t_tests = _tests(a.dry)
    brc, bench_lines, t_bench = _bench(a.dry)
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    dev = ("dry run: CPU under the Triton interpreter" if a.dry else
           ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    report = [
        "# alignkit GPU check" + (" (dry run)" if a.dry else ""), "",
        f"- device: {dev}",
        f"- python {platform.python_version()}, torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}), triton {tv}",
        f"- tests ({', '.join(TESTS)}): {'passed' if rc == 0 else f'FAILED (exit {rc})'} in "
        f"{t_tests:.0f} s: "
        f"{test_lines[-1] if test_lines else 'no output'}",
        f"- compile report (bench.gpu_compile): exit {crc} in {t_compile:.0f} s; tiles vs roofline "
        f"(bench.gpu_roofline): exit {trc} in {t_tiles:.0f} s",
        f"- bench.gpu: exit {brc} in {t_bench:.0f} s; whole check {time.time() - t0:.0f} s", "",
        "## What the kernels compile to on this card", ""] + compile_lines + [
        "", "## Each default kernel against its roofline", ""] + tile_lines + [
        "", "## bench.gpu", ""] + bench_lines
    if rc != 0:
        report += ["", "## Test output (last 60 lines)", "", "```"] + test_lines[-60:] + ["```"]
    os.makedirs(os.path.dirname(os.path.abspath(a.report)), exist_ok=True)
    with open(a.report, "w") as f:
        f.write("\n".join(report) + "\n")
    print("\n".join(report))
    return rc or brc or crc or trc


if __name__ == "__main__":
    sys.exit(main())
