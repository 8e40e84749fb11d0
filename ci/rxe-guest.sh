#!/usr/bin/env bash
# Runs INSIDE the qemu guest booted by ci/rxe-test or ci/rxe-bench (see ci/rxe-lib.sh).
#
#   rxe-guest.sh WORKDIR test|bench
#
# WORKDIR is the host directory shared read-write with the guest (vng --rwdir); the host
# script put WORKDIR/params.sh there (the guest starts with an empty environment), and
# reads back what this script leaves there:
#   setup-failed        why rxe could not be brought up (absent on success)
#   test.log, rc.N      test mode: the test binaries' output, exit status of binary N
#   bench.log, bench/   bench mode: all perftest output; bench/results = "name client server"
#   guest-started       written first: the host's boot watchdog (rxe_boot) waits for it
#   guest-done          written last; if it is missing the guest died (panic, timeout)
#
# Setup follows docs/RXE.md: rdma_rxe on the loopback device gives rxe0 with GID index 1
# = ::ffff:127.0.0.1 (RoCE v2), so servers and clients here all use 127.0.0.1. The guest's
# memlock limit defaults to 8 MiB, too little to register a buffer pool, hence ulimit -l.
set -uo pipefail

W=${1:?workdir}
MODE=${2:?mode}
DEV=rxe0
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "rxe-guest: $*"; }
setup_failed() {
    say "SETUP FAILED: $*"
    echo "$*" >"$W/setup-failed"
    echo ok >"$W/guest-done"
    exit 1
}

echo ok >"$W/guest-started"

# shellcheck source=/dev/null
source "$W/params.sh" || setup_failed "cannot read $W/params.sh"

# ---- bring up rxe0 on lo -------------------------------------------------------------
ip link set lo up || setup_failed "ip link set lo up"
modprobe rdma_rxe || setup_failed "modprobe rdma_rxe (kernel $(uname -r))"
rdma link add "$DEV" type rxe netdev lo || setup_failed "rdma link add $DEV type rxe netdev lo"
for _ in $(seq 1 50); do
    grep -q ACTIVE "/sys/class/infiniband/$DEV/ports/1/state" 2>/dev/null && break
    sleep 0.2
done
grep -q ACTIVE "/sys/class/infiniband/$DEV/ports/1/state" 2>/dev/null \
    || setup_failed "$DEV port 1 not ACTIVE: $(cat "/sys/class/infiniband/$DEV/ports/1/state" 2>&1)"
ulimit -l unlimited || setup_failed "ulimit -l unlimited"

export ZCIO_RDMA_REQUIRED=1 ZCIO_RDMA_DEVICE=$DEV TMPDIR=$W
say "kernel $(uname -r), $DEV ACTIVE on lo, gid[1] $(cat "/sys/class/infiniband/$DEV/ports/1/gids/1"), memlock $(ulimit -l)"

# ---- test mode: run each prebuilt libtest binary --------------------------------------
run_tests() {
    local log=$W/test.log n=${#RXE_BINS[@]} i rc t0
    : >"$log"
    for i in "${!RXE_BINS[@]}"; do
        local bin=${RXE_BINS[$i]} dir=${RXE_DIRS[$i]}
        # Like `cargo test`: run from the package directory, with CARGO_MANIFEST_DIR set.
        [ -d "$dir" ] || dir=$W
        say "[$((i + 1))/$n] ${bin##*/}"
        {
            echo "=== [$((i + 1))/$n] $bin --test-threads=$RXE_THREADS ${RXE_ARGS[*]:-}"
            echo "=== cwd $dir"
        } >>"$log"
        t0=$SECONDS
        (cd "$dir" && CARGO_MANIFEST_DIR=$dir exec timeout -k 10 "$RXE_BIN_TIMEOUT" \
            "$bin" --test-threads="$RXE_THREADS" ${RXE_ARGS[@]+"${RXE_ARGS[@]}"}) \
            </dev/null >>"$log" 2>&1
        rc=$?
        [ "$rc" != 124 ] || echo "=== TIMED OUT after ${RXE_BIN_TIMEOUT}s (killed by the guest)" >>"$log"
        echo "=== exit status $rc after $((SECONDS - t0))s" >>"$log"
        echo "$rc" >"$W/rc.$i"
        say "[$((i + 1))/$n] exit status $rc after $((SECONDS - t0))s"
    done
}

# ---- bench mode: perftest against itself on 127.0.0.1, then the optional command -----
PORT=18515
# perf_pair NAME TOOL ARGS...: server in the background, client once the server listens.
# Every run gets its own TCP port, so a server still in TIME_WAIT cannot get in the way.
perf_pair() {
    local name=$1 tool=$2; shift 2
    local log=$W/bench.log out=$W/bench/$name spid crc src
    PORT=$((PORT + 1))
    say "$name: $tool $* -p $PORT"
    echo "=== $name: $tool -d $DEV -x 1 $* -p $PORT [127.0.0.1]" >>"$log"
    timeout -k 5 120 "$tool" -d "$DEV" -x 1 "$@" -p "$PORT" >"$out.server" 2>&1 &
    spid=$!
    local t0=$SECONDS listening=no
    for _ in $(seq 1 150); do
        if ss -Hltn "sport = :$PORT" 2>/dev/null | grep -q .; then listening=yes; break; fi
        kill -0 "$spid" 2>/dev/null || break
        sleep 0.2
    done
    echo "--- server listening on $PORT: $listening (waited ~$((SECONDS - t0))s)" >>"$log"
    timeout -k 5 120 "$tool" -d "$DEV" -x 1 "$@" -p "$PORT" 127.0.0.1 >"$out.client" 2>&1
    crc=$?
    wait "$spid"
    src=$?
    { echo "--- client (exit $crc)"; cat "$out.client"; echo "--- server (exit $src)"; cat "$out.server"; } >>"$log"
    echo "$name $crc $src" >>"$W/bench/results"
    say "$name: client exit $crc, server exit $src"
}

run_bench() {
    local r s
    mkdir -p "$W/bench"
    : >"$W/bench.log"
    : >"$W/bench/results"
    {
        echo "=== $(uname -r), $(nproc) CPUs, TCG guest"
        ibv_devinfo -d "$DEV"
    } >>"$W/bench.log" 2>&1
    for r in $(seq 1 "$RXE_REPEAT"); do
        for s in "${RXE_BW_SIZES[@]}"; do
            perf_pair "write_bw-$s-r$r" ib_write_bw -s "$s" -D "$RXE_DURATION"
        done
        for s in "${RXE_BW_SIZES[@]}"; do
            perf_pair "read_bw-$s-r$r" ib_read_bw -s "$s" -D "$RXE_DURATION"
        done
        for s in "${RXE_LAT_SIZES[@]}"; do
            perf_pair "write_lat-$s-r$r" ib_write_lat -s "$s" -n "$RXE_LAT_ITERS"
            perf_pair "send_lat-$s-r$r" ib_send_lat -s "$s" -n "$RXE_LAT_ITERS"
        done
    done
    if [ -n "$RXE_BENCH_CMD" ]; then
        say "bench command: $RXE_BENCH_CMD"
        echo "=== bench command: $RXE_BENCH_CMD" >>"$W/bench.log"
        (cd "$RXE_REPO" && exec timeout -k 10 "$RXE_BENCH_CMD_TIMEOUT" bash -c "$RXE_BENCH_CMD") \
            </dev/null >>"$W/bench.log" 2>&1
        local rc=$?
        echo "=== bench command exit status $rc" >>"$W/bench.log"
        echo "$rc" >"$W/bench-cmd.rc"
        say "bench command exit status $rc"
    fi
}

case $MODE in
    test) run_tests ;;
    bench) run_bench ;;
    *) setup_failed "unknown mode $MODE" ;;
esac
echo ok >"$W/guest-done"
