# Two commands for a fresh machine (each sets itself up):
#   make demo    the main job: alignkit demo (DPO on an embedded task, offline, about a minute)
#   make test    the test suite
PY      ?= python3
# The venv and its pins: `make test` installs .venv from constraints.txt (the releases the README's
# two commands were last verified with). `make test VENV=.venv-latest PINS=` installs the newest
# releases pyproject's ranges allow instead (CI runs both: .ci/run).
VENV    ?= .venv
PINS    ?= constraints.txt
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: venv demo rlhf-demo test docs results bench bench-full bench-trainer bench-compare bench-baseline clean sanitize gpu-check gpu-compile gpu-wheels update-constraints

# torch==2.13.0 first, by exact version: it is the CPU wheel (a bare `torch` would pull a CUDA build;
# so the latest venv keeps it too). Then alignkit itself, editable, which builds the C++ extension
# alignkit._C from csrc/.
$(STAMP): pyproject.toml setup.py $(PINS) $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q $(if $(PINS),-c $(PINS)) -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# Refresh the pins: a venv of the newest releases the ranges allow, frozen into constraints.txt.
update-constraints:
	rm -rf .venv-latest
	$(MAKE) venv VENV=.venv-latest PINS=
	.venv-latest/bin/python .ci/pins.py freeze constraints.txt

# The Triton kernels run under the interpreter (numpy) in a process of their own: TRITON_INTERPRET
# must be set before triton is imported.
test: $(STAMP)
	$(VPY) -m pytest -q tests --ignore-glob='tests/test_triton_*.py'
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -W ignore::RuntimeWarning tests/test_triton_*.py
	$(VPY) -m pytest -q bench --benchmark-disable   # the benchmark suite's cases, once each, tiny shapes

demo: $(STAMP)
	$(VENV)/bin/alignkit demo

# The docs site into site/ (mkdocs-material + mkdocstrings, the `docs` extra): --strict fails on any
# warning. docs/hooks.py generates the API reference and the TrainConfig table at build time. The
# python blocks of README.md and docs/ run in `make test` (tests/test_readme.py,
# tests/test_docs_examples.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict --quiet

# bench/RESULTS.md rendered from the benches' rows (bench/out/rows/, bench/baselines/); tests/
# test_results_render.py fails when the two differ.
results: $(STAMP)
	$(VPY) -m bench.render_results

# SFT, a reward model and PPO on the demo task (examples/rlhf_demo.py, ~80 s on 2 cores)
rlhf-demo: $(STAMP)
	$(VPY) examples/rlhf_demo.py

bench: $(STAMP)
	$(VPY) -m bench.core --preset small

bench-trainer: $(STAMP)
	$(VPY) -m bench.trainer --write

# The pytest-benchmark suite's alignkit cases (~2 min) against the baseline checked in for this
# machine class (bench/baselines/<class>.json, the class printed by `compare --class`): fails when
# a ratio to the GEMM floor regresses by more than 10% (alignkit.bench.compare), or when there is
# no baseline for this class. bench-baseline writes one from the whole suite (~12 min).
BASELINE ?= bench/baselines/$(shell $(VPY) -m alignkit.bench.compare --class).json
bench-compare: $(STAMP)
	mkdir -p bench/out
	$(VPY) -m pytest -q bench --benchmark-only -k alignkit --benchmark-json=bench/out/suite.json
	$(VPY) -m alignkit.bench.compare $(BASELINE) bench/out/suite.json

bench-baseline: $(STAMP)
	mkdir -p bench/baselines
	$(VPY) -m pytest -q bench --benchmark-only --benchmark-json=$(BASELINE)

bench-full: $(STAMP)
	$(VPY) -m bench.core --preset full --write

# One prepared check for a lent GPU machine (issue #20; Python, torch + CUDA, triton, transformers,
# pytest preinstalled, no network): builds alignkit in place, installs the peers' wheels from
# wheels/ when they are there, runs the Triton tests on CUDA and bench.gpu on two shapes, and
# writes a markdown report to REPORT (default bench/out/gpu-check.md; under 8 minutes). DRY=1: the same
# script on this CPU under the Triton interpreter (CI runs it). Peers are not on that image:
# download their wheels here first with `make gpu-wheels` (needs the network).
REPORT ?= bench/out/gpu-check.md
gpu-check:
ifeq ($(DRY),1)
	$(MAKE) venv
	$(VPY) -m bench.gpu_check $(REPORT) --dry
else
	python3 -m pip install -q --no-build-isolation --no-deps -e .
	if ls wheels/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-deps --no-index wheels/*.whl; fi
	python3 -m bench.gpu_check $(REPORT)
endif

# The Triton kernels compiled for sm_80 / sm_90a / sm_100a on this CPU, no GPU needed (issue #34):
# registers, spills, shared memory, blocks per SM and the matrix instruction, read from the cubins
# (bench.gpu_compile); writes bench/out/gpu-compile.json and .md. Fails on a compile error, a
# spill in the default path, a block over an architecture's shared memory that the launcher can
# pick, a bf16/fp16 GEMM kernel without tensor-core instructions (~2-3 min on 2 cores; CI runs it).
gpu-compile: $(STAMP)
	$(VPY) -m bench.gpu_compile --out bench/out

gpu-wheels: $(STAMP)
	mkdir -p wheels
	$(VPY) -m pip download -q --no-deps -d wheels "trl==1.16.*" "liger-kernel==0.8.*" cut-cross-entropy

clean:
	rm -rf .venv .venv-latest build alignkit/_C*.so *.egg-info site

# The C++ kernels' own test binary under AddressSanitizer + UBSan (no Python involved).
sanitize:
	g++ -std=c++17 -O1 -g -fopenmp -fsanitize=address,undefined -fno-omit-frame-pointer \
	    -Icsrc csrc/test_kernels.cpp csrc/logprob_kernels.cpp -o csrc/test_kernels
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1 ./csrc/test_kernels
