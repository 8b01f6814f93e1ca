#!/usr/bin/env bash
# The checks a session with a lent GPU runs, prepared here so that they fit its few minutes of
# device time: two steps, each one device call well inside a call's 10 minutes.
#
#   bash benchmarks/gpu_session.sh tests    # the CUDA test files (cut at 240 s): tests.log
#   bash benchmarks/gpu_session.sh bench    # the GPU issue's table and goals (cut at 420 s):
#                                           # bench.log and bench_gpu.py's JSON files
#
# The caps leave room in the session's 15 minutes of device time for the machine's start (1-2
# minutes) and its idle wait: give each device call a timeout_s of the cap + 30 s, and give the
# machine back right after the bench call. XENTKIT_COMMIT, when set, is recorded (the checkout
# may travel without its .git).
#
# Results go to $OUT (the device tool's folder that comes back), else ./gpu-session. xentkit is
# imported from this checkout's src (nothing to install there). Optional peers travel as wheels
# in .whl (see the device tool's README: liger-kernel==0.8.5 and cut-cross-entropy==25.1.1, with
# --no-deps) and are installed first when that folder is there; without them their goals say
# "not measured". Every step's exit status is printed; the script exits with the first failure.
set -u
step="${1:?usage: gpu_session.sh tests|bench}"
case "$step" in
tests | bench) ;;
*)
    echo "unknown step: $step (tests or bench)" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.." || exit 2
out="$(realpath -m "${OUT:-gpu-session}")"  # (absolute: the benchmark's children run elsewhere)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XENTKIT_TEST_DEVICE=cuda
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "$step" = bench ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PWD/.whl-site" .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$PWD/.whl-site"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    echo "commit ${XENTKIT_COMMIT:-$(git log --oneline -1 2>/dev/null)}"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

case "$step" in
tests)
    # the Triton paths on CUDA (the interpreter runs the same files on CPU tensors in CI), the
    # host-sync counts under CUDA's sync debug mode, CUDA graphs, precision at V = 256k and the
    # 2^31-element offsets; the machine-code test is left to CI (it needs no GPU), and so are the
    # files that build CPU tensors alone (test_check_labels.py, test_log_probs_traced.py). Not
    # stopped at the first failure; an interrupt at the cap (SIGINT) still prints pytest's summary
    # of the failures; on 8 workers (of 16 cores) where pytest-xdist is there (compiling ~800 kernels), each
    # test cut at 120 s where pytest-timeout is
    set -o pipefail
    extra=()
    python3 -c "import xdist" 2>/dev/null && extra+=(-n 8)
    python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
    timeout -s INT -k 20 240 python3 -m pytest -q -p no:cacheprovider --maxfail=25 -rfE --durations=25 ${extra[@]+"${extra[@]}"} \
        tests/test_triton.py tests/test_triton_log_probs.py tests/test_triton_host_syncs.py \
        tests/test_triton_reduction.py tests/test_triton_chunks.py tests/test_triton_int64.py \
        tests/test_triton_device_guard.py tests/test_triton_compiled.py tests/test_triton_linear_compiled.py \
        tests/test_distributed_triton.py tests/test_precision.py \
        tests/test_torch_review_fixes.py tests/test_masked_class_smoothing.py \
        2>&1 | tee "$out/tests.log"
    status=$?
    ;;
bench)
    set -o pipefail
    timeout -k 20 420 python3 benchmarks/bench_gpu.py --out "$out" 2>&1 | tee "$out/bench.log"
    status=$?
    ;;
esac
echo "gpu_session.sh $step: exit $status"
exit "$status"
