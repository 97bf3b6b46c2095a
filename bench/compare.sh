#!/usr/bin/env bash
# Benchmarks plugboard against its peers on this machine and prints a table of medians and ratios:
#   1. ingest: 8 connections x 200,000 lines of 64 bytes into `server > /dev/null`, against
#      `ncat -l -k 127.0.0.1 PORT > /dev/null` (timed until the server has read everything);
#   2. echo round trip, one connection, 64-byte lines: `server --mode echo` against a minimal
#      std-only echo server (examples/echo_floor.rs);
#   3. 10,000 clients: connect time, RSS per client, SIGTERM-to-exit (tests/suite/scale.rs);
#   4. the load client itself: how fast one client process sends into a reader that only reads;
#   5. chat fan-out: K clients join, each sends M lines of 32 B, every line must reach the K-1
#      others (client --chat), against `ncat -l -k --chat -m 2000`, at 50 x 4000, 200 x 500 and
#      400 x 50: deliveries per second, and server CPU (from /proc) per million deliveries;
#   6. 10,000 chat clients: RSS per client, one line to all the others (tests/suite/scale.rs).
# Runs of plugboard and its peer alternate, so a noisy machine hurts both alike.
# Usage: bench/compare.sh [RUNS]   (default 5 runs per workload)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}

if ! command -v ncat >/dev/null; then
    apt-get update -qq && apt-get install -y -qq ncat >/dev/null
fi
cargo build --release --quiet --bins --examples
client=target/release/client
server=target/release/server
floor=target/release/examples/echo_floor
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
mkfifo "$tmp/never"
exec 3<>"$tmp/never" # read by ncat, written by nobody, held open by this script

# start NAME CMD...: runs CMD with stderr to a file and waits for its `listening on ADDR` line.
start() {
    local name=$1 err; shift
    # A new file each start: reusing one, this loop could read the last server's port before
    # the new process's redirection had emptied it.
    err=$(mktemp "$tmp/$name.XXXXXX")
    "$@" >/dev/null 2>"$err" &
    pids+=($!)
    for _ in $(seq 200); do
        # Only whole lines: the log line may be caught half written.
        port=$(sed -n 's/.*listening on [^ ]*:\([0-9][0-9]*\)$/\1/p' "$err" 2>/dev/null | head -1) || true
        [ -n "$port" ] && [ -z "$(tail -c1 "$err")" ] && return 0
        sleep 0.05
    done
    echo "$name did not start" >&2; cat "$err" >&2; exit 1
}
stop_last() { kill "${pids[-1]}" 2>/dev/null || true; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
start_ncat() {
    port=$(free_port)
    # Its stdin a pipe that never ends (fd 3): at EOF, as a background job's stdin is, or with
    # --recv-only, ncat closes its side at once, which the client rightly takes as nothing
    # confirmed.
    ncat -l -k 127.0.0.1 "$port" <&3 >/dev/null 2>"$tmp/ncat.err" &
    pids+=($!)
    for _ in $(seq 200); do
        ss -ltn "sport = :$port" | grep -q LISTEN && return 0
        sleep 0.05
    done
    echo "ncat did not start" >&2; exit 1
}
# json FIELD: extracts a number from the client's --json line on stdin.
json() { grep -o "\"$1\":[0-9.]*" | head -1 | cut -d: -f2; }
median() { grep . | sort -g | awk '{a[NR]=$1} END {m=int((NR+1)/2); if (NR%2) print a[m]; else print (a[m]+a[m+1])/2}'; }

# cpu_ticks PID: user + system time of a process so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
chat_sizes="50x4000 200x500 400x50"
for size in $chat_sizes; do : >"$tmp/chat.$size.plugboard"; : >"$tmp/chat.$size.ncat"; : >"$tmp/cpu.$size.plugboard"; : >"$tmp/cpu.$size.ncat"; done
# chat_run NAME SIZE: one chat workload against the server last started; records deliveries/s
# and server CPU ticks per million deliveries.
chat_run() {
    local name=$1 k=${2%x*} m=${2#*x} pid=${pids[-1]} before out delivered elapsed after
    before=$(cpu_ticks "$pid")
    out=$($client --port "$port" --chat --connections "$k" --count "$m" --size 32 --json -q || true)
    after=$(cpu_ticks "$pid")
    delivered=$(echo "$out" | json delivered); elapsed=$(echo "$out" | json elapsed_s)
    if [ "$(echo "$out" | json errors)" != 0 ]; then echo "chat $2 against $name: errors: $out" >&2; return; fi
    awk -v d="$delivered" -v e="$elapsed" 'BEGIN { print d / e }' >>"$tmp/chat.$2.$name"
    awk -v d="$delivered" -v t="$((after - before))" 'BEGIN { print t / (d / 1e6) }' >>"$tmp/cpu.$2.$name"
}

ingest="--connections 8 --count 200000 --interval 0 --size 64 --json -q"
: >"$tmp/ingest.plugboard"; : >"$tmp/ingest.ncat"
: >"$tmp/rtt.plugboard"; : >"$tmp/rtt.floor"; : >"$tmp/push"
for run in $(seq "$runs"); do
    echo "run $run of $runs" >&2
    start server "$server" --port 0
    $client --port "$port" $ingest | json messages_per_s >>"$tmp/ingest.plugboard"
    stop_last
    start_ncat
    $client --port "$port" $ingest | json messages_per_s >>"$tmp/ingest.ncat"
    stop_last

    # Round trips: server on CPU 0, client on CPU 1. Unpinned, the scheduler sometimes puts both
    # on one CPU, where a round trip takes ~5 us instead of ~65 us, and medians flip between the two.
    start echo taskset -c 0 "$server" --port 0 --mode echo
    taskset -c 1 $client --port "$port" --rtt --count 20000 --interval 0 --size 64 --json -q | json p50 >>"$tmp/rtt.plugboard"
    stop_last
    start floor taskset -c 0 "$floor"
    taskset -c 1 $client --port "$port" --rtt --count 20000 --interval 0 --size 64 --json -q | json p50 >>"$tmp/rtt.floor"
    stop_last

    start discard "$floor" --discard
    $client --port "$port" $ingest | json messages_per_s >>"$tmp/push"
    stop_last

    for size in $chat_sizes; do
        start chat "$server" --port 0 --mode chat
        chat_run plugboard "$size"
        stop_last
        port=$(free_port)
        ncat -l -k --chat -m 2000 127.0.0.1 "$port" <&3 >/dev/null 2>"$tmp/ncat.err" &
        pids+=($!)
        for _ in $(seq 200); do ss -ltn "sport = :$port" | grep -q LISTEN && break; sleep 0.05; done
        chat_run ncat "$size"
        stop_last
    done
done
chat_scale=${SKIP_SCALE:+skipped}; [ -n "$chat_scale" ] || chat_scale=$(cargo test --release --quiet --test suite scale::ten_thousand_chat -- --ignored --nocapture 2>/dev/null | grep 'chat clients: ' || true)

scale=${SKIP_SCALE:+skipped}; [ -n "$scale" ] || scale=$(cargo test --release --quiet --test suite scale::ten_thousand_clients -- --ignored --nocapture 2>/dev/null | grep 'clients: ' || true)

ip=$(median <"$tmp/ingest.plugboard"); in=$(median <"$tmp/ingest.ncat")
rp=$(median <"$tmp/rtt.plugboard"); rf=$(median <"$tmp/rtt.floor")
push=$(median <"$tmp/push")
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r); $runs runs each, medians"
echo
echo "| workload | plugboard | peer | ratio |"
echo "| --- | --- | --- | --- |"
awk -v p="$ip" -v n="$in" 'BEGIN { printf "| ingest, 8 x 200,000 lines of 64 B (lines/s) | %.2f M | ncat -l -k: %.2f M | %.2fx (higher is better) |\n", p/1e6, n/1e6, p/n }'
awk -v p="$rp" -v f="$rf" 'BEGIN { printf "| echo round trip, 64 B, p50 | %.1f us | std-only echo floor: %.1f us | %.3fx (lower is better) |\n", p, f, p/f }'
awk -v c="$push" -v p="$ip" 'BEGIN { printf "| one load client into a reader that only reads (lines/s) | %.2f M | server ingest: %.2f M | %.2fx client headroom |\n", c/1e6, p/1e6, c/p }'
for size in $chat_sizes; do
    cp=$(median <"$tmp/chat.$size.plugboard"); cn=$(median <"$tmp/chat.$size.ncat")
    tp=$(median <"$tmp/cpu.$size.plugboard"); tn=$(median <"$tmp/cpu.$size.ncat")
    awk -v s="$size" -v p="$cp" -v n="$cn" -v tp="$tp" -v tn="$tn" 'BEGIN { printf "| chat %s, 32 B lines (deliveries/s; server CPU ticks per M deliveries) | %.2f M; %.1f | ncat --chat: %.2f M; %.1f | %.2fx throughput, %.2fx CPU (lower is better) |\n", s, p/1e6, tp, n/1e6, tn, (n > 0 ? p/n : 0), (tn > 0 ? tp/tn : 0) }'
done
echo
echo "10,000 clients: ${scale:-not measured}"
echo "10,000 chat clients: ${chat_scale:-not measured}"
