#!/usr/bin/env bash
# Train one or more configurations side by side on one GPU within a wall-clock budget, from packs.
#
#   scripts/train_on_gpu.sh BUDGET_S RESULTS PACKS CONFIG [CONFIG ...]
#
# PACKS is a folder of packs (`pose-estimator pack` output, one per sub-folder).
# Each CONFIG (a TrainConfig YAML) trains into runs/gpu_<config name>. A first
# run of 200 steps each, all side by side, measures seconds per step; then the
# runs resume with as many steps as fill what is left of BUDGET_S, and a time
# limit as a backstop (a run cut short still writes its model, and re-running
# resumes it). RESULTS gets <config name>.tgz (model, metrics, log) per run, split
# into .tgz.partNN files of 15 MiB where larger (cat them back together).
#
# Needs python3 with torch, OpenCV, numpy, PyYAML, safetensors, tqdm and
# pytorch-kinematics; wheels found in .whl/ are installed into /tmp/site first
# (a lent machine that cannot reach a package index). A robot whose URDF comes
# from pybullet_data needs pybullet there, or POSE_ESTIMATOR_PYBULLET_DATA naming
# a copy of the URDF's folder (.pybullet_data/ at the repository root is used if present).
set -uo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,16p' "$0"
  exit 2
fi
budget=$1 results=$2 packs=$3
shift 3
t0=$SECONDS
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -d .pybullet_data ] && export POSE_ESTIMATOR_PYBULLET_DATA=${POSE_ESTIMATOR_PYBULLET_DATA:-$PWD/.pybullet_data}
mkdir -p "$results"
mapfile -t data < <(find "$packs" -mindepth 2 -maxdepth 2 -name pack.json -printf '%h\n' | sort)
[ ${#data[@]} -gt 0 ] || { echo "no packs under $packs"; exit 1; }
configs=("$@")
names=()
for c in "${configs[@]}"; do names+=("$(basename "$c" .yaml)"); done
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
echo "packs: ${data[*]}"

run() {  # config name steps [more train flags]
  python3 -m pose_estimator.cli train --data "${data[@]}" --out "runs/gpu_$2" --config "$1" --steps "$3" \
    --no-progress "${@:4}" >>"$results/$2.log" 2>&1
}

# 1: 200 steps each, side by side, to measure the speed they share (steps 101-200: the first
# hundred include the GPU's warm-up; still, alone in phase 2 a run went 2-2.5x faster than this).
for i in "${!configs[@]}"; do run "${configs[i]}" "${names[i]}" 200 & done
wait
for n in "${names[@]}"; do tail -n 2 "$results/$n.log"; done

# 2: fill the budget (30 s kept for start-up and packing up).
left=$(( budget - (SECONDS - t0) - 30 ))
for i in "${!configs[@]}"; do
  n=${names[i]}
  steps=$(python3 - "runs/gpu_$n/metrics.csv" "$left" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if int(r["step"]) > 100]
sec = sorted(float(r["sec_per_step"]) for r in rows)[len(rows) // 2]  # median, all runs going
print(int(rows[-1]["step"]) + int(0.93 * max(0, int(sys.argv[2]) - 25) / sec))
EOF
  ) || steps=200
  echo "$n: $steps steps in about $left s"
  run "${configs[i]}" "$n" "$steps" --time-limit "$left" &
done
wait

# 3: results, in parts of at most 15 MiB (what a lent machine may hand back per file)
for n in "${names[@]}"; do
  tail -n 3 "$results/$n.log"
  mv "$results/$n.log" "runs/gpu_$n/train.log"
  tar czf "$results/$n.tgz" -C "runs/gpu_$n" model.safetensors metrics.csv train.log
  if [ "$(stat -c %s "$results/$n.tgz")" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15M -d "$results/$n.tgz" "$results/$n.tgz.part" && rm "$results/$n.tgz"
  fi
done
echo "done in $(( SECONDS - t0 )) s"
