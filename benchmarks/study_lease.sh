#!/usr/bin/env bash
# Runs benchmarks/small_scale_study.py on a GPU machine that only takes commands of at most 10 minutes
# (this workplace's device tool): the study runs in the background, in its own process session, so
# it outlives one command; each command waits, then packs what is finished into $OUT. On a machine of
# your own, run the study directly instead (benchmarks/STUDY.md).
#
#   bash benchmarks/study_lease.sh start   # install the carried wheels, start the study, wait, pack
#   bash benchmarks/study_lease.sh wait    # (install more wheels,) wait until the study ends or WAIT_S pass, pack
#   bash benchmarks/study_lease.sh stop    # wait WAIT_S, then stop the study cleanly (SIGTERM: units resume later), pack
#
# Settings (environment): STUDY (the study folder), DATA (photos), PRESET, DEVICES (one slot per entry;
# "0 0 0 0 0 0" = six units sharing GPU 0), BUDGET_S (the study's --time_budget_s), WAIT_S,
# ONLY (the chains, in priority order), SET (preset changes for --set, as in "finetune_steps=3000"), STAGES (--stage), PY (the Python to use), OUT (where packed results go),
# WHEELS (a folder of wheels to install first; "" for none), ADOPT (a study folder whose base VAE to reuse:
# --adopt_base), PACK_BASE=0 (never return the base VAE: its 42 MB take long enough to lose the machine).
set -u
cd "$(dirname "$0")/.."
STUDY=${STUDY:-/tmp/study}
DATA=${DATA:-.gpudata/photos}
PRESET=${PRESET:-short}
DEVICES=${DEVICES:-0 0 0 0 0 0}
BUDGET_S=${BUDGET_S:-1600}
WAIT_S=${WAIT_S:-570}
PY=${PY:-python3}
OUT=${OUT:-/tmp/study_out}
WHEELS=${WHEELS-.whl}
ADOPT=${ADOPT:-}
PACK_BASE=${PACK_BASE:-1}
ONLY=${ONLY:-baseline/0 ssreg/0 baseline/1 ssreg/1 baseline/2 ssreg/2 baseline_scratch ssreg_scratch legendre random_a no_centering alpha_0.5}
started=$(date +%s)
# Are all these pids running? kill -0 alone also succeeds for a zombie, and the study's processes outlive the command
# that started them, so their parent becomes an init that may never reap them (it does not in this sandbox).
running() {
    [ $# -gt 0 ] || return 1
    local p state
    for p in "$@"; do
        state=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1)
        if [ -z "$state" ]; then kill -0 "$p" 2>/dev/null || return 1  # no /proc: the plain check
        elif [ "$state" = Z ]; then return 1; fi
    done
}
mkdir -p "$STUDY" "$OUT"

if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
    echo "installed $(ls "$WHEELS" | wc -l) wheels from $WHEELS"
fi
if [ "${1:-}" = start ]; then
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    if [ -f "$STUDY/runner.pid" ] && running $(cat "$STUDY/runner.pid"); then
        echo "a study is already running in $STUDY (pid $(cat "$STUDY/runner.pid")): wait for it, or stop it" >&2
        exit 4
    fi
    # A later start on the same machine (more chains in the time left) appends to the logs and keeps the
    # monitors of the first: two loggers writing into one truncated file would interleave their lines.
    if [ ! -f "$STUDY/monitors.pid" ] || ! running $(cat "$STUDY/monitors.pid"); then
        # one of them died: stop the survivor too, so that the pair is started afresh rather than doubled
        [ -f "$STUDY/monitors.pid" ] && kill $(cat "$STUDY/monitors.pid") 2>/dev/null
        monitors=()
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$STUDY/gpu_info.csv"
            setsid nohup nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 \
                >> "$STUDY/gpu_usage.csv" 2>&1 < /dev/null &
            monitors+=($!)
        fi
        # the CPU side too: load average and busy share of all cores, every 15 s
        setsid nohup bash -c 'while true; do read -r _ a b c d e f g _ < /proc/stat; sleep 15; read -r _ A B C D E F G _ < /proc/stat;
            busy=$(( (A+B+C+F+G) - (a+b+c+f+g) )); total=$(( busy + (D+E) - (d+e) ));
            echo "$(date -u +%T) load $(cut -d" " -f1 /proc/loadavg) busy $(( 100 * busy / (total > 0 ? total : 1) ))%"; done' \
            >> "$STUDY/cpu_usage.log" 2>&1 < /dev/null &
        monitors+=($!)
        echo "${monitors[*]}" > "$STUDY/monitors.pid"
    fi
    [ -s "$STUDY/runner.log" ] && echo "--- start at $(date -u +%FT%TZ): ONLY=$ONLY ${SET:+SET=$SET }STAGES=${STAGES:-all} ---" >> "$STUDY/runner.log"
    # shellcheck disable=SC2086
    setsid nohup "$PY" benchmarks/small_scale_study.py --data_dir "$DATA" --output_dir "$STUDY" --preset "$PRESET" \
        --devices $DEVICES --time_budget_s "$BUDGET_S" ${ADOPT:+--adopt_base "$ADOPT"} --only $ONLY ${SET:+--set $SET} \
        --stage ${STAGES:-all} >> "$STUDY/runner.log" 2>&1 < /dev/null &
    echo $! > "$STUDY/runner.pid"
    echo "started the study (pid $(cat "$STUDY/runner.pid")) at $(date -u +%FT%TZ)"
elif [ "${1:-}" != wait ] && [ "${1:-}" != stop ]; then
    echo "usage: $0 start|wait|stop" >&2
    exit 2
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

pid=$(cat "$STUDY/runner.pid" 2>/dev/null)
alive() { [ -n "$pid" ] && running "$pid"; }
while alive && [ $(( $(date +%s) - started )) -lt "$WAIT_S" ]; do
    sleep 5
done
if [ -z "$pid" ]; then echo "no study was started on this machine ($STUDY/runner.pid is missing)"; exit 3; fi
if [ "${1:-}" = stop ] && alive; then
    kill -TERM "$pid"
    for _ in $(seq 150); do alive || break; sleep 1; done
fi
if alive; then echo "the study is still running"; else echo "the study has ended"; fi
tail -n 25 "$STUDY/runner.log"

# pack: the small result files, plus the float16 base VAE the first time it is done (for a later lease)
pack_base=()
if [ "$PACK_BASE" = 1 ] && [ -f "$STUDY/base/done.json" ] && [ ! -f "$STUDY/.base_packed" ]; then
    pack_base=(--pack_base)
    touch "$STUDY/.base_packed"
fi
"$PY" benchmarks/small_scale_study.py --output_dir "$STUDY" --stage report --pack_dir "$OUT" "${pack_base[@]}" 2>&1 | tail -n 3
cp "$STUDY/runner.log" "$OUT/runner.log"
[ -f "$STUDY/gpu_usage.csv" ] && cp "$STUDY/gpu_usage.csv" "$OUT/gpu_usage.csv"
[ -f "$STUDY/cpu_usage.log" ] && cp "$STUDY/cpu_usage.log" "$OUT/cpu_usage.log"
ls -la "$OUT"
