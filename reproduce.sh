#!/usr/bin/env bash
# Regenerate every table and figure of the PHI-S and SD-PLL reproductions with one command.
#
#   ./reproduce.sh                          # mini: offline teachers, 2 seeds, every table, and the SD-PLL study
#   ./reproduce.sh --only phis_matched      # the method sweep on the statistics-matched teachers (3 seeds,
#                                           # 36 jobs; on its own because it alone takes longer than the mini)
#   ./reproduce.sh --profile smoke          # every table from tiny runs (a few minutes)
#   ./reproduce.sh --profile paper --dry-run                  # compose every paper-scale job, run nothing
#   ./reproduce.sh --profile paper --launcher slurm           # paper scale through hydra-submitit (SLURM)
#   ./reproduce.sh --profile paper_tiny --only phis   # the paper profile at toy sizes on 2 CPU processes
#
# Options: --profile smoke|mini|paper|paper_tiny   --launcher local|slurm   --dry-run
#          --only all|phis|phis_matched|sd
#          --runs DIR (run outputs, default outputs/reproduce)   --results DIR (tables and figures;
#          default experiments/results for mini, <runs>/<profile>/tables otherwise)
#          --lanes N (local launcher: the method sweep runs as N multiruns side by side, the methods
#          dealt among them, each on its share of the cores; default 2 for mini, else 1)
# Sweep directories are deterministic (<runs>/<profile>/<experiment>/<method>/seed_<n>): running again
# skips finished jobs, resumes interrupted ones from last.ckpt and retries failed ones.
set -euo pipefail
cd "$(dirname "$0")"

PROFILES=(smoke mini paper paper_tiny)
ONLYS=(all phis phis_matched sd)
PROFILE=mini
LAUNCHER=local
DRY_RUN=0
ONLY=all
RUNS=outputs/reproduce
RESULTS=""
LANES=""

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "reproduce.sh: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) need "$@"; PROFILE="$2"; shift 2 ;;
    --launcher) need "$@"; LAUNCHER="$2"; shift 2 ;;
    --only) need "$@"; ONLY="$2"; shift 2 ;;
    --runs) need "$@"; RUNS="$2"; shift 2 ;;
    --results) need "$@"; RESULTS="$2"; shift 2 ;;
    --lanes) need "$@"; LANES="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'; valid: --profile {${PROFILES[*]}} --launcher {local,slurm} --only {${ONLYS[*]}} --runs DIR --results DIR --dry-run" ;;
  esac
done

[[ " ${PROFILES[*]} " == *" $PROFILE "* ]] || die "unknown profile '$PROFILE'; choose one of: ${PROFILES[*]}"
[[ "$LAUNCHER" == local || "$LAUNCHER" == slurm ]] || die "unknown launcher '$LAUNCHER'; choose one of: local slurm"
[[ " ${ONLYS[*]} " == *" $ONLY "* ]] || die "unknown --only '$ONLY'; choose one of: ${ONLYS[*]}"
if [[ ("$ONLY" == all || "$ONLY" == sd) && "$PROFILE" == paper_tiny ]]; then
  echo "[reproduce] paper_tiny covers the PHI-S paper path only; the SD-PLL paper sweep has no tiny" \
    "stand-in here: skipped (use --profile smoke for the SD-PLL study at tiny sizes)" >&2
  [[ "$ONLY" == sd ]] && exit 0
  ONLY=phis
fi
if [[ -z "$LANES" ]]; then if [[ "$PROFILE" == mini ]]; then LANES=2; else LANES=1; fi; fi
[[ "$LANES" =~ ^[1-9][0-9]*$ ]] || die "--lanes must be a positive integer, got '$LANES'"

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
if [[ -z "$RESULTS" ]]; then
  if [[ "$PROFILE" == mini ]]; then RESULTS=experiments/results; else RESULTS="$RUNS/$PROFILE/tables"; fi
fi
LAUNCH=()
DRY_LAUNCH=()
if [[ "$LAUNCHER" == slurm ]]; then LAUNCH=(launcher=slurm); DRY_LAUNCH=(--launcher slurm); fi
# CPU profiles: one math thread per process. Multi-threaded jobs on a small, shared CPU spend most of
# their time spin-waiting for each other (measured here: evaluation 30 s instead of > 6 min).
if [[ "$PROFILE" != paper ]]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
fi
COMMON=("+profile=$PROFILE" "reproduce.runs=$RUNS" "reproduce.tables=$RESULTS/phis" "${LAUNCH[@]}")
START=$SECONDS
if [[ "$PROFILE" == paper_tiny && $DRY_RUN == 0 ]]; then
  # the paper profile's PHIS_* data variables, pointed at stand-ins written from the offline photos
  echo "[reproduce] paper_tiny: stand-in shards and ImageNet/ADE20k/VOC folders in $RUNS/$PROFILE/data"
  eval "$("$PY" -m experiments.phis.standins "$RUNS/$PROFILE/data")"
fi

stage() { echo; echo "=== [reproduce $PROFILE] $* ($(( SECONDS - START )) s elapsed)"; }

if [[ $DRY_RUN == 1 ]]; then
  if [[ "$ONLY" == all || "$ONLY" == phis ]]; then
    stage "dry run: composing every PHI-S job config"
    "$PY" -m experiments.phis.tables dry-run --profile "$PROFILE" "${DRY_LAUNCH[@]}" \
      "reproduce.runs=$RUNS" "reproduce.tables=$RESULTS/phis"
  fi
  if [[ "$ONLY" == phis_matched ]]; then
    stage "dry run: composing the statistics-matched sweep's config"
    "$PY" -m phis.train experiment=phis_methods_matched "+profile=$PROFILE" --cfg job --resolve > /dev/null
  fi
  if [[ "$ONLY" == all || "$ONLY" == sd ]]; then
    stage "dry run: listing every SD-PLL job of profile $PROFILE (and whether its data is ready)"
    "$PY" -m experiments.selfdistill.study dry-run --profile "$PROFILE" --sweeps "$RUNS/$PROFILE/selfdistill"
  fi
  stage "dry run done: every job config resolves"
  exit 0
fi

phis_sweep() {  # $1: experiment; a failed job stops the sweep, so aggregate what finished and fail
  local exp="$1" sweep="$RUNS/$PROFILE/phis_methods"
  stage "PHI-S: $exp multirun -> $sweep"
  if ! "$PY" -m phis.train -m "experiment=$exp" "${COMMON[@]}"; then
    echo "[reproduce] $exp: a job failed; tables from what finished, then stopping (rerun to retry)" >&2
    "$PY" -m experiments.phis.tables aggregate "$sweep" "$RESULTS/phis" || true
    exit 1
  fi
}

phis_lanes() {  # $1: experiment, $2: seeds (a,b,...), $3: tables dir; the method sweep as LANES multiruns
  # side by side, the methods dealt round-robin (each lane runs every seed of its methods, so lanes get
  # equal shares whatever the number of seeds), each lane on its share of the cores; then the tables
  local exp="$1" out="$3" sweep="$RUNS/$PROFILE/$1" logs="$RUNS/$PROFILE/logs" methods lane pids=() failed=0
  IFS=, read -r -a methods <<< "$METHODS"
  local threads=$(( $(nproc) / LANES )); (( threads >= 1 )) || threads=1
  threads="${OMP_NUM_THREADS:-$threads}"  # a caller's setting wins
  mkdir -p "$logs"
  for (( lane = 0; lane < LANES && lane < ${#methods[@]}; lane++ )); do
    local mine=() i
    for (( i = lane; i < ${#methods[@]}; i += LANES )); do mine+=("${methods[$i]}"); done
    local list; list=$(IFS=,; echo "${mine[*]}")
    stage "PHI-S: $exp lane $lane (methods $list; seeds $2; $threads thread(s)) -> $sweep, log $logs/${exp}_lane$lane.log"
    OMP_NUM_THREADS="$threads" "$PY" -m phis.train -m "experiment=$exp" "${COMMON[@]}" \
      "method=$list" "seed=$2" "~hydra.callbacks.aggregate" > "$logs/${exp}_lane$lane.log" 2>&1 &
    pids+=($!)
  done
  for lane in "${!pids[@]}"; do
    if ! wait "${pids[$lane]}"; then failed=1; echo "[reproduce] lane $lane failed; see its log" >&2; fi
  done
  stage "PHI-S: aggregating $sweep"
  "$PY" -m experiments.phis.tables aggregate "$sweep" "$out"
  if [[ $failed == 1 ]]; then echo "[reproduce] a job failed; rerun to retry it" >&2; exit 1; fi
}

# the method sweep's methods (conf/experiment/phis_methods.yaml; the matched sweep inherits them)
METHODS=$(sed -n 's/^ *method: *//p' conf/experiment/phis_methods.yaml | head -1)
[[ -n "$METHODS" ]] || die "no 'method:' sweep list in conf/experiment/phis_methods.yaml"
profile_seeds=$(sed -n 's/^ *seed: *//p' "conf/profile/$PROFILE.yaml" | tail -1)
if [[ "$ONLY" == all || "$ONLY" == phis ]]; then
  if [[ $LANES -gt 1 && "$LAUNCHER" == local ]]; then
    phis_lanes phis_methods "$profile_seeds" "$RESULTS/phis"
  else
    phis_sweep phis_methods
  fi
  phis_sweep phis_analyses
  stage "PHI-S: the paper's claims on this sweep -> $RESULTS/phis/claims.md"
  "$PY" -m experiments.phis.claims "$RUNS/$PROFILE/phis_methods" "$RESULTS/phis"
  if [[ "$LAUNCHER" == slurm ]]; then
    echo "[reproduce] SLURM: each sweep's tables are written by its on_multirun_end hook on this host"
  fi
fi

if [[ "$ONLY" == phis_matched ]]; then
  # The statistics-matched teacher set (conf/teachers/offline_matched.yaml): real offline taps mapped onto
  # PHI-S Table 7's statistics, fitted on the offline photos, at the mini profile's sizes. Its 36 jobs
  # (12 methods x 3 seeds) take longer than the rest of the mini reproduction, so they run on request.
  [[ "$PROFILE" == mini ]] || die "--only phis_matched uses the offline teachers; run it with --profile mini"
  matched_out="$RESULTS/phis_matched"
  if [[ $LANES -gt 1 && "$LAUNCHER" == local ]]; then
    phis_lanes phis_methods_matched 0,1,2 "$matched_out"
  else
    "$PY" -m phis.train -m experiment=phis_methods_matched "${COMMON[@]}" seed=0,1,2 \
      "reproduce.tables=$matched_out" || { echo "[reproduce] a matched job failed; rerun to retry" >&2; exit 1; }
  fi
  stage "PHI-S matched: analyses and the paper's claims -> $matched_out"
  "$PY" -m experiments.phis.tables analyses "$RUNS/$PROFILE/phis_methods_matched" "$matched_out"
  "$PY" -m experiments.phis.claims "$RUNS/$PROFILE/phis_methods_matched" "$matched_out"
fi

if [[ "$ONLY" == all || "$ONLY" == sd ]]; then
  # paper: the six datasets' grids (conf/sd_experiment/paper_<dataset>.yaml); their roots come from
  # PHIS_<DATASET>_ROOT or PHIS_SD_DATA_ROOT/<dataset>, the ResNet34 weights from PHIS_RESNET34_WEIGHTS.
  # Each sweep trains its jobs' probes in batches (phis.selfdistill.sweep), then runs its multirun.
  stage "SD-PLL: $PROFILE study -> $RESULTS/selfdistill"
  "$PY" -m experiments.selfdistill.study run --profile "$PROFILE" --out "$RESULTS/selfdistill" \
    --sweeps "$RUNS/$PROFILE/selfdistill"
fi

stage "done in $(( SECONDS - START )) s"
if [[ "$ONLY" == all || "$ONLY" == phis ]]; then echo "PHI-S tables and figures: $RESULTS/phis/README.md"; fi
if [[ -d "$RESULTS/phis_matched" && "$ONLY" != sd && "$ONLY" != phis ]]; then
  echo "PHI-S on the statistics-matched teachers: $RESULTS/phis_matched/README.md (claims: claims.md)"
fi
if [[ "$ONLY" == all || "$ONLY" == sd ]]; then echo "SD-PLL tables and figures: $RESULTS/selfdistill/"; fi
exit 0
