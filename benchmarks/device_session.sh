#!/usr/bin/env bash
# Everything the GPU side of issues 5, 6, 7 and 9 needs, in one device call (device time is
# short: one warm machine, one command). Run from the repository root on the lent machine:
#
#   bash benchmarks/device_session.sh OUTDIR [runtime,calibrate,kernels,profile]
#
# - runtime:   the layers checked against the float64 reference (benchmarks/runtime_check.py),
#              then NCCL all_to_all sweep + EP/HP/FSEP layers x top-k {2,4,8} x {uniform,
#              Zipf 1.2} on every GPU of the machine (benchmarks/runtime.py), run directories;
# - calibrate: `moesim calibrate` for the simulator's compute model (needs pulp/highspy:
#              carry the wheels in .whl/, device README);
# - kernels:   every Triton kernel checked and timed against its ceiling (benchmarks/kernels.py);
# - profile:   torch.profiler of one EP, HP and FSEP layer on one GPU
#              (benchmarks/runtime_profile.py).
# Results land in OUTDIR as at most 8 files (what the device tool brings back): runs.tgz,
# h200-measured.csv, kernels.json, kernels_summary.txt and one log per part.
set -uo pipefail
out=${1:?usage: device_session.sh OUTDIR [parts]}
parts=${2:-runtime,calibrate,kernels,profile}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "device_session: $gpus GPU(s), parts $parts, $(date -u +%FT%TZ)"
status=0
run() {  # name, command...: a failing part is reported and the others still run
    local name=$1; shift
    echo "== $name: $*"
    if ! "$@" > "$out/$name.log" 2>&1; then
        echo "== $name FAILED (tail of $out/$name.log):"; tail -20 "$out/$name.log"; status=1
    else
        tail -5 "$out/$name.log"
    fi
}
if [[ ,$parts, == *,runtime,* ]]; then
    # The layers' GPU numerics first (bf16 against the float64 reference): timings of a
    # wrong layer are worth nothing.
    run runtime bash -c "torchrun --standalone --nproc-per-node $gpus benchmarks/runtime_check.py \
        && torchrun --standalone --nproc-per-node $gpus benchmarks/runtime.py \
        --out /tmp/device_runtime"
    tar czf "$out/runs.tgz" -C /tmp/device_runtime . 2>/dev/null
fi
if [[ ,$parts, == *,calibrate,* ]]; then
    run calibrate python3 -m moesim.cli calibrate --device cuda --repeat 20 --d-model 4096 \
        --d-ffn 1408 --experts 64 --expert-shapes 2048x1408,512x704,256x704 --out "$out/h200-measured.csv"
fi
if [[ ,$parts, == *,kernels,* ]]; then
    run kernels python3 -m benchmarks.kernels --out "$out"
fi
if [[ ,$parts, == *,profile,* ]]; then
    run profile python3 -m benchmarks.runtime_profile --strategy ep,hp,fsep --top-k 8 --rows 12
fi
exit $status
