#!/usr/bin/env bash
# Try the NVML collector on a machine with NVIDIA GPUs: 20 ticks 0.5 s apart, printed as JSON
# lines (nothing is published), then one summary line per GPU. Extra arguments go to the
# collector, e.g. `scripts/nvml_check.sh --slow-interval 2 --attribution jobs.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out=$(mktemp)
trap 'rm -f "$out"' EXIT

"$py" -m collectors.cli nvml --stdout --count 20 --interval 0.5 "$@" | tee "$out"

"$py" - "$out" <<'PY'
import json, statistics, sys
samples = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{len(samples)} node samples from node {samples[0]['node']!r}" if samples else "no samples")
by_gpu = {}
for sample in samples:
    for gpu in sample["gpus"]:
        by_gpu.setdefault(gpu["index"], []).append(gpu)
for index, gpus in sorted(by_gpu.items()):
    g = gpus[-1]
    print(
        f"gpu {index} {g['model']} {g['uuid']}: util {statistics.mean(x['util_gpu'] for x in gpus):.1f}%, "
        f"power {statistics.mean(x['power_w'] for x in gpus):.0f}/{g['power_limit_w']:.0f} W, "
        f"sm {statistics.mean(x['sm_clock_mhz'] for x in gpus):.0f} MHz, temp {g['temp_c']:.0f} C, "
        f"reasons {sorted({hex(x['clocks_event_reasons']) for x in gpus})}, "
        f"energy in {sum('energy_j' in x for x in gpus)}/{len(gpus)} ticks, xids {[x['xid'] for x in gpus if 'xid' in x]}"
    )
PY
