#!/usr/bin/env bash
# Everything the GPU side of issues 5, 6, 7 and 9 needs, in one device call (device time is
# short: one warm machine, one command). Run from the repository root on the lent machine:
#
#   bash benchmarks/device_session.sh OUTDIR [runtime,calibrate,kernels,profile,hp]
#
# - runtime:   the layers checked against the float64 reference (benchmarks/runtime_check.py),
#              then NCCL all_to_all sweep + EP/HP/FSEP layers x top-k {2,4,8} x {uniform,
#              Zipf 1.2} on every GPU of the machine (benchmarks/runtime.py), run directories;
# - calibrate: `moesim calibrate` for the simulator's compute model (needs pulp/highspy:
#              carry the wheels in .whl/, device README);
# - kernels:   every Triton kernel checked and timed against its ceiling (benchmarks/kernels.py);
# - profile:   torch.profiler of one EP, HP and FSEP layer on one GPU
#              (benchmarks/runtime_profile.py).
# - hp:        issue 17: the streaming router and the fused thin expert checked and timed
#              (benchmarks/kernels.py sections), the compute model's curves for them at the HP
#              benchmark's shapes (h200-hp.csv), the HP layer step before and after them
#              (benchmarks/hp_layer.py, hp_runs.tgz) and `moesim validate` of those runs
#              against that calibration (hp_validate.log).
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
if [[ ,$parts, == *,hp,* ]]; then
    run hp_kernels python3 -m benchmarks.kernels --only ceilings,stream_router,fused_expert \
        --out "$out"
    run hp_calibrate python3 -m moesim.cli calibrate --device cuda --repeat 10 --d-model 2048 \
        --d-ffn 1024 --experts 64 --gelu-shapes 128x1024,64x512 \
        --router-shapes 128x64k8,64x64k8 --out "$out/h200-hp.csv"
    run hp_layer torchrun --standalone --nproc-per-node "$gpus" benchmarks/hp_layer.py \
        --out /tmp/device_hp
    cp "$out/h200-hp.csv" configs/calibration/h200-hp.csv 2>/dev/null
    for r in /tmp/device_hp/runs/*; do
        echo "== $r" >> "$out/hp_validate.log"
        python3 -m moesim.cli validate --run "$r" --set cluster.gpu=h200-hp \
            >> "$out/hp_validate.log" 2>&1 || status=1
    done
    grep -E "^== |step-time error" "$out/hp_validate.log"
    tar czf "$out/hp_runs.tgz" -C /tmp/device_hp . 2>/dev/null
fi
if [[ ,$parts, == *,profile,* ]]; then
    run profile python3 -m benchmarks.runtime_profile --strategy ep,hp,fsep --top-k 8 --rows 12
fi
exit $status
