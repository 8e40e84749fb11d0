# shellcheck shell=bash
# Host-side helpers shared by ci/rxe-test and ci/rxe-bench (sourced, not executed).
#
# Why a VM at all (docs/RXE.md): the host kernel has no RDMA, so the rxe device only
# exists inside a qemu guest booting Debian's own kernel (/boot/vmlinuz-6.1.0-*-amd64,
# which has rdma_rxe) over the host's root filesystem, via virtme-ng (`vng`). /dev/kvm
# cannot run that kernel, so the guest runs under TCG (--disable-kvm): everything in it
# is 10-50x slower than on the host. The guest sees the host's files read-only; the only
# place it can write to that the host sees afterwards is the --rwdir we hand it.
#
# Environment (all optional):
#   ZCIO_VNG          path to vng            (default: vng on PATH, else /opt/zcio-venv/bin/vng)
#   ZCIO_RXE_KERNEL   guest kernel image     (default: newest /boot/vmlinuz-6.1.0-*-amd64)
#   ZCIO_RXE_MEMORY   guest memory           (default: 2G)
#   ZCIO_RXE_CPUS     guest CPUs             (default: 2)
#   ZCIO_RXE_WORKDIR  the guest's writable directory; must be new or empty
#                     (default: a fresh mktemp -d under ${TMPDIR:-/tmp})
#   ZCIO_RXE_KEEP=1   keep the workdir even when everything passed
#   ZCIO_RXE_VERBOSE=1  show the guest kernel's console messages (vng --verbose), e.g.
#                     to see a kernel panic

RXE_CI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RXE_REPO_DIR=$(cd "$RXE_CI_DIR/.." && pwd)

rxe_die() { echo "${RXE_NAME:-rxe}: error: $*" >&2; exit 2; }
rxe_log() { echo "${RXE_NAME:-rxe}: $*" >&2; }

# Finds vng and puts its directory on PATH: vng runs its own helper commands
# (virtme-ng-init etc.) by name, so calling it by full path alone is not enough.
rxe_find_vng() {
    local vng=${ZCIO_VNG:-}
    [ -n "$vng" ] || vng=$(command -v vng || true)
    [ -n "$vng" ] || vng=/opt/zcio-venv/bin/vng
    [ -x "$vng" ] || rxe_die "vng not found (run ci/setup, or set ZCIO_VNG)"
    RXE_VNG=$vng
    PATH="$(dirname "$vng"):$PATH"
    export PATH
}

# Picks the Debian 6.1 kernel: it is the one with rdma_rxe, and its modules must exist
# under /lib/modules for modprobe to work in the guest.
rxe_find_kernel() {
    local k=${ZCIO_RXE_KERNEL:-}
    if [ -z "$k" ]; then
        # shellcheck disable=SC2012 # plain kernel file names; sort -V orders the versions
        k=$(ls /boot/vmlinuz-6.1.0-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    if [ -z "$k" ] || [ ! -r "$k" ]; then
        rxe_die "no guest kernel /boot/vmlinuz-6.1.0-*-amd64 (run ci/setup, or set ZCIO_RXE_KERNEL)"
    fi
    local ver=${k##*/vmlinuz-}
    [ -d "/lib/modules/$ver" ] || rxe_die "kernel $k has no /lib/modules/$ver"
    RXE_KERNEL=$k
}

# Creates the guest's writable directory (RXE_WORK).
rxe_make_workdir() {
    local prefix=$1
    if [ -n "${ZCIO_RXE_WORKDIR:-}" ]; then
        mkdir -p "$ZCIO_RXE_WORKDIR"
        [ -z "$(ls -A "$ZCIO_RXE_WORKDIR")" ] || rxe_die "ZCIO_RXE_WORKDIR=$ZCIO_RXE_WORKDIR is not empty"
        RXE_WORK=$(cd "$ZCIO_RXE_WORKDIR" && pwd)
    else
        RXE_WORK=$(mktemp -d "${TMPDIR:-/tmp}/$prefix.XXXXXX")
    fi
}

# Removes the workdir after a fully successful run, unless asked to keep it.
rxe_cleanup_workdir() {
    local ok=$1
    if [ "$ok" = 1 ] && [ "${ZCIO_RXE_KEEP:-0}" != 1 ] && [ -z "${ZCIO_RXE_WORKDIR:-}" ]; then
        rm -rf "$RXE_WORK"
    else
        rxe_log "logs kept in $RXE_WORK"
    fi
}

# rxe_boot TIMEOUT_SECONDS MODE
# Boots one guest that runs `ci/rxe-guest.sh WORKDIR MODE` and waits for it, with stdin
# from /dev/null (CI has none; vng must not wait for a terminal). The guest console goes
# to stdout and to WORKDIR/console.log. Sets RXE_BOOT_RC (vng's exit status: 124 means
# the timeout hit) and RXE_BOOT_SECS.
#
# Boot watchdog: under TCG a boot occasionally hangs before the guest runs anything
# (seen on these machines: 17 minutes with an empty console, where a boot takes 30-120 s).
# If the guest script has not written WORKDIR/guest-started within ZCIO_RXE_BOOT_LIMIT
# seconds (default 600), the guest is killed and booted again, at most ZCIO_RXE_BOOT_TRIES
# times in all (default 2). A guest that started is never restarted: its tests run once.
rxe_boot() {
    local limit=$1 mode=$2 cmd start
    local boot_limit=${ZCIO_RXE_BOOT_LIMIT:-600} tries=${ZCIO_RXE_BOOT_TRIES:-2} try=1
    cmd="bash $(printf '%q' "$RXE_CI_DIR/rxe-guest.sh") $(printf '%q' "$RXE_WORK") $mode"
    local verbose=()
    [ "${ZCIO_RXE_VERBOSE:-0}" != 1 ] || verbose=(--verbose)
    start=$(date +%s)
    while :; do
        rxe_log "booting $RXE_KERNEL under TCG (${ZCIO_RXE_CPUS:-2} CPUs, ${ZCIO_RXE_MEMORY:-2G}), limit ${limit}s, try $try/$tries"
        rm -f "$RXE_WORK/guest-started"
        set +e
        # setsid: the guest (timeout, vng, virtme-run, qemu) gets a process group of its
        # own, so the watchdog can kill all of it.
        setsid timeout -k 30 "$limit" "$RXE_VNG" --run "$RXE_KERNEL" --disable-kvm --disable-monitor \
            --memory "${ZCIO_RXE_MEMORY:-2G}" --cpus "${ZCIO_RXE_CPUS:-2}" \
            --rwdir "$RXE_WORK" --cwd "$RXE_REPO_DIR" --exec "$cmd" ${verbose[@]+"${verbose[@]}"} \
            </dev/null >"$RXE_WORK/console.try$try" 2>&1 &
        local guest=$! boot_start waited=0 hung=0
        boot_start=$(date +%s)
        tail -n +1 -f --pid="$guest" "$RXE_WORK/console.try$try" 2>/dev/null &
        local follow=$!
        while kill -0 "$guest" 2>/dev/null; do
            if [ ! -f "$RXE_WORK/guest-started" ]; then
                waited=$(( $(date +%s) - boot_start ))
                if [ "$waited" -ge "$boot_limit" ]; then
                    hung=1
                    kill -TERM -- "-$guest" 2>/dev/null
                    sleep 5
                    kill -KILL -- "-$guest" 2>/dev/null
                    break
                fi
            fi
            sleep 2
        done
        wait "$guest"
        RXE_BOOT_RC=$?
        wait "$follow" 2>/dev/null
        cat "$RXE_WORK/console.try$try" >>"$RXE_WORK/console.log"
        set -e
        if [ "$hung" = 1 ] && [ "$try" -lt "$tries" ]; then
            rxe_log "the guest did not start within ${boot_limit}s (a hung boot); killed, booting again"
            try=$((try + 1))
            continue
        fi
        [ "$hung" = 0 ] || rxe_log "the guest did not start within ${boot_limit}s on any of $tries tries"
        break
    done
    RXE_BOOT_SECS=$(( $(date +%s) - start ))
    rxe_log "guest exited with status $RXE_BOOT_RC after ${RXE_BOOT_SECS}s"
}

# Writes "NAME=(quoted words...)" / "NAME=quoted" lines the guest script sources: this
# is how parameters reach the guest, whose environment starts empty.
rxe_param() {
    local name=$1; shift
    printf '%s=(' "$name"
    [ $# -eq 0 ] || printf '%q ' "$@"
    printf ')\n'
}
