#!/usr/bin/env bash
# Benchmarks one chat room spread over several plugboard servers by Redis pub/sub (`server --mode
# chat --chat-bus redis://... --chat-room NAME`, README "Scaling out"), and prints a table of medians.
# One fresh `redis-server --save '' --appendonly no` on a free port serves every run; each run uses
# a room (a channel) of its own, so nothing of one run reaches another.
#
# Every workload is the load client's chat fan-out (client --chat --size 32): K connections join,
# each sends M lines of 32 B, and every line must reach the K-1 others. With several servers the
# client spreads its connections over them (`--server A --server B`: connection i to server
# i mod n), so a line reaches the sender's neighbours on its own server directly and everyone else
# through Redis. Configurations, for each workload:
#   1. one server, plain chat (no bus);
#   2. one server with --chat-bus: the bus's own cost (every batch published to Redis, and
#      Redis's echo of it received and dropped);
#   3. two servers sharing the room over the bus;
#   4. three servers.
# Workloads: two bursts as fast as the client can send (50 x 4000 and 200 x 500, as in
# bench/compare.sh; the client writes 64 KiB at a time, so the servers read, publish and relay
# big batches of lines), and two paced ones (--interval: each connection writes one line, sleeps,
# writes the next: one line a batch, as in a real chat), 50 connections every 20 ms and every 10 ms
# for about 3 s.
# Per run: deliveries/s (`delivered` / `elapsed_s`, from the client's --json summary), delivery
# latency p50 and p99 (from a send to its receipt), CPU (user + system, from /proc/PID/stat) of
# the servers together and of Redis, per million deliveries, and for each server's bus relay
# thread (`plugboard-bus-relay`, which hands lines from other servers to the room) the share of
# the run's wall time it spent on a CPU and waiting for one (runnable, not running:
# /proc/PID/task/TID/schedstat), averaged over the servers.
# Losses: each server's summary at its stop (`chat bus: P lines published, R received, L lost,
# U not published`) gives "missing" = the lines the other servers published that it never received
# (counted this way, not from L, which only sees a gap once a later line from the same server
# arrives), plus U; and Redis's log gives the subscribers it disconnected for overrunning the
# pub/sub output buffer limit (client-output-buffer-limit pubsub, 32 MiB hard by default). A run
# whose client reports errors is left out of the medians and reported.
# Runs alternate between the configurations, so a noisy machine hurts all alike.
# Then once, two servers only, two ramps: the 50-connection burst made longer (x 8000, 16000, ...)
# until a run loses lines, and the paced 50 connections made faster (every 40, 20, 10, 5, 2 ms)
# until p99 passes 1 s; each step's line is printed.
# Usage: bench/scale_out.sh [RUNS]   (default 5 runs per workload; about 4 to 5 minutes at 5 on
#        2 vCPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}

if ! command -v redis-server >/dev/null; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
cargo build --release --quiet --bins
client=target/release/client
server=target/release/server
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

# start NAME CMD...: runs CMD with stderr to a file and waits for its `listening on ADDR` line;
# sets port and err (the log file).
start() {
    local name=$1; shift
    # A new file each start: reusing one, this loop could read the last server's port before
    # the new process's redirection had emptied it.
    err=$(mktemp "$tmp/$name.XXXXXX")
    "$@" >/dev/null 2>"$err" &
    pids+=($!)
    for _ in $(seq 200); do
        # Only whole lines: the log line may be caught half written.
        port=$(sed -n 's/.*listening on [^ ]*:\([0-9][0-9]*\)$/\1/p' "$err" 2>/dev/null | head -1) || true
        [ -n "$port" ] && [ -z "$(tail -c1 "$err")" ] && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || break # exited: no use waiting
        sleep 0.05
    done
    echo "$name did not start" >&2; cat "$err" >&2; exit 1
}
stop_last() { kill "${pids[-1]}" 2>/dev/null || true; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# json FIELD: extracts a number from the client's --json line on stdin (nothing if it has none:
# a failed run has no latencies).
json() { { grep -o "\"$1\":[0-9.]*" || true; } | head -1 | cut -d: -f2; }
# median: of the numbers on stdin; nothing if there are none.
median() { { grep . || true; } | sort -g | awk '{a[NR]=$1} END {if (!NR) exit; m=int((NR+1)/2); if (NR%2) print a[m]; else print (a[m]+a[m+1])/2}'; }
# cpu_ticks PID: user + system time of a process so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tick_ms=$(awk -v t="$(getconf CLK_TCK)" 'BEGIN { print 1000 / t }')
now() { date +%s.%N; }

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$tmp/redis.log" 2>&1 &
pids+=($!)
redis_pid=$!
for _ in $(seq 200); do
    ss -ltn "sport = :$redis_port" | grep -q LISTEN && break
    kill -0 "$redis_pid" 2>/dev/null || { echo "redis-server did not start" >&2; cat "$tmp/redis.log" >&2; exit 1; }
    sleep 0.05
done
bus=redis://127.0.0.1:$redis_port
# Subscribers Redis has disconnected for overrunning the pub/sub output buffer limit, so far.
overruns() { grep -c 'output buffer limits' "$tmp/redis.log" || true; }

# Configurations: plain (1 server, no bus), bus1, bus2, bus3. Workloads: NAME K M [client args].
configs="plain bus1 bus2 bus3"
workloads=("burst50 50 4000" "burst200 200 500" "paced20 50 150 --interval 20ms" "paced10 50 300 --interval 10ms")
for w in "${workloads[@]}" ramp; do
    for c in $configs; do
        for f in rate p50 p99 cpu rcpu subon subwait; do : >"$tmp/$f.${w%% *}.$c"; done
        echo 0 >"$tmp/errors.${w%% *}.$c"; echo 0 >"$tmp/missing.${w%% *}.$c"; echo 0 >"$tmp/overruns.${w%% *}.$c"
    done
done
: >"$tmp/lossless" # deliveries/s of every multi-server run with no error and nothing missing

# chat NAME CONFIG ROOM K M [client args...]: one run of workload NAME on CONFIG; appends its
# figures to the files above and prints the client's summary line as
# `rate p50 p99 errors missing overruns messages_per_s`.
chat() {
    local name=$1 config=$2 room=$3 k=$4 m=$5; shift 5
    local n=1 flags=() servers=() spids=() errs=() subs=() i p t
    case $config in
        plain) ;;
        bus*) n=${config#bus}; flags=(--chat-bus "$bus" --chat-room "$room") ;;
    esac
    for i in $(seq "$n"); do
        start "$config" "$server" --port 0 --mode chat "${flags[@]}"
        servers+=(--server "127.0.0.1:$port"); spids+=("${pids[-1]}"); errs+=("$err")
        for t in /proc/"${pids[-1]}"/task/*; do
            [ "$(cat "$t/comm" 2>/dev/null)" = plugboard-bus-r ] && subs+=("$t")
        done
    done
    local cpu0=0 cpu1=0 rcpu0 rcpu1 sched0 sched1 over0 over1 t0 t1 out
    for p in "${spids[@]}"; do cpu0=$((cpu0 + $(cpu_ticks "$p"))); done
    rcpu0=$(cpu_ticks "$redis_pid"); over0=$(overruns)
    sched0=$(for t in "${subs[@]}"; do cat "$t/schedstat"; done | awk '{on += $1; wait += $2} END {print on + 0, wait + 0}')
    t0=$(now)
    out=$($client --chat "${servers[@]}" --connections "$k" --count "$m" --size 32 --json -q "$@" 2>/dev/null || true)
    t1=$(now)
    sched1=$(for t in "${subs[@]}"; do cat "$t/schedstat"; done | awk '{on += $1; wait += $2} END {print on + 0, wait + 0}')
    for p in "${spids[@]}"; do cpu1=$((cpu1 + $(cpu_ticks "$p"))); done
    rcpu1=$(cpu_ticks "$redis_pid")
    # Stops them all at once, then waits: each logs its summary as it exits.
    for p in "${spids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${spids[@]}"; do wait "$p" 2>/dev/null || true; done
    local keep=()
    for p in "${pids[@]}"; do [[ " ${spids[*]} " == *" $p "* ]] || keep+=("$p"); done
    pids=("${keep[@]}")
    over1=$(overruns)
    # Missing: per server, what the others published minus what it received; plus what no one
    # published.
    local missing=0
    if [ "$n" -gt 1 ] || [ "$config" != plain ]; then
        missing=$(for e in "${errs[@]}"; do
            sed -n 's/.*chat bus: \([0-9]*\) lines published, \([0-9]*\) received, [0-9]* lost, \([0-9]*\) not published.*/\1 \2 \3/p' "$e"
        done | awk -v n="$n" '{pub[NR] = $1; rec[NR] = $2; unp += $3; total += $1}
            END { if (NR != n) { print "?"; exit } for (i = 1; i <= NR; i++) m += total - pub[i] - rec[i]; print m + unp }')
    fi
    for e in "${errs[@]}"; do
        grep -h -E 'not keeping up|connection lost|lines from server .* lost|disconnected: not reading' "$e" |
            sed 's/^[^ ]* *[A-Z]* //' | sort | uniq -c | sed "s/^/    [$name $config] /" >&2 || true
    done
    local delivered elapsed errors p50 p99
    delivered=$(echo "$out" | json delivered); elapsed=$(echo "$out" | json elapsed_s)
    errors=$(echo "$out" | json errors); p50=$(echo "$out" | json p50); p99=$(echo "$out" | json p99)
    if [ -z "$errors" ] || [ "$errors" != 0 ] || [ "$missing" != 0 ]; then
        echo "  $name on $config: errors ${errors:-?}, missing $missing, Redis overruns $((over1 - over0)): ${out:-no summary}" >&2
        echo $(($(cat "$tmp/errors.$name.$config") + 1)) >"$tmp/errors.$name.$config"
    else
        awk -v d="$delivered" -v e="$elapsed" 'BEGIN { print d / e }' >>"$tmp/rate.$name.$config"
        echo "$p50" >>"$tmp/p50.$name.$config"; echo "$p99" >>"$tmp/p99.$name.$config"
        awk -v d="$delivered" -v t="$((cpu1 - cpu0))" -v ms="$tick_ms" 'BEGIN { print t * ms / (d / 1e6) }' >>"$tmp/cpu.$name.$config"
        awk -v d="$delivered" -v t="$((rcpu1 - rcpu0))" -v ms="$tick_ms" 'BEGIN { print t * ms / (d / 1e6) }' >>"$tmp/rcpu.$name.$config"
        [ "$n" -lt 2 ] || awk -v d="$delivered" -v e="$elapsed" 'BEGIN { print d / e }' >>"$tmp/lossless"
    fi
    if [ ${#subs[@]} -gt 0 ]; then
        echo "$sched0 $sched1" | awk -v w="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" -v n="${#subs[@]}" \
            '{ printf "%.1f %.1f\n", 100 * ($3 - $1) / 1e9 / w / n, 100 * ($4 - $2) / 1e9 / w / n }' |
            { read -r on wait; echo "$on" >>"$tmp/subon.$name.$config"; echo "$wait" >>"$tmp/subwait.$name.$config"; }
    fi
    echo $(($(cat "$tmp/missing.$name.$config") + ${missing/\?/0})) >"$tmp/missing.$name.$config"
    echo $(($(cat "$tmp/overruns.$name.$config") + over1 - over0)) >"$tmp/overruns.$name.$config"
    echo "${delivered:-0} ${elapsed:-0} ${p50:-0} ${p99:-0} ${errors:-?} $missing $((over1 - over0)) $(echo "$out" | json messages_per_s)"
}

for run in $(seq "$runs"); do
    echo "run $run of $runs" >&2
    for w in "${workloads[@]}"; do
        read -r -a args <<<"$w"
        for c in $configs; do
            chat "${args[0]}" "$c" "scale-$run-${args[0]}-$c-$$" "${args[@]:1}" >/dev/null
        done
    done
done

# Ramps, once, two servers.
echo "ramps" >&2
: >"$tmp/ramp"
for m in 8000 16000 32000 64000; do
    read -r d e p50 p99 errors missing over mps < <(chat ramp bus2 "scale-ramp-burst-$m-$$" 50 "$m")
    awk -v m="$m" -v d="$d" -v e="$e" -v p50="$p50" -v p99="$p99" -v er="$errors" -v mi="$missing" -v o="$over" -v l="$mps" 'BEGIN {
        printf "| burst 50 x %d (%.1f MB sent) | %.0f k | %s | %.1f ms | %.1f ms | %s | %s | %s |\n",
            m, 50 * m * 32 / 1e6, l / 1e3, (e > 0 ? sprintf("%.2f M", d / e / 1e6) : "-"), p50 / 1e3, p99 / 1e3, er, mi, o }' >>"$tmp/ramp"
    [ "$errors" = 0 ] && [ "$missing" = 0 ] || break
done
for ms in 40 20 10 5 2; do
    read -r d e p50 p99 errors missing over mps < <(chat ramp bus2 "scale-ramp-paced-$ms-$$" 50 $((3000 / ms)) --interval "${ms}ms")
    awk -v i="$ms" -v d="$d" -v e="$e" -v p50="$p50" -v p99="$p99" -v er="$errors" -v mi="$missing" -v o="$over" -v l="$mps" 'BEGIN {
        printf "| paced, 50 every %d ms (%d lines/s asked) | %.1f k | %s | %.1f ms | %.1f ms | %s | %s | %s |\n",
            i, 50 * 1000 / i, l / 1e3, (e > 0 ? sprintf("%.2f M", d / e / 1e6) : "-"), p50 / 1e3, p99 / 1e3, er, mi, o }' >>"$tmp/ramp"
    [ "$errors" = 0 ] && [ "$missing" = 0 ] && awk -v p="$p99" 'BEGIN { exit !(p <= 1e6) }' || break
done

label() {
    case $1 in
        burst50) echo "burst 50 x 4000" ;;
        burst200) echo "burst 200 x 500" ;;
        paced20) echo "paced 50 x 150, every 20 ms" ;;
        paced10) echo "paced 50 x 300, every 10 ms" ;;
    esac
}
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r); $(redis-server --version | cut -d' ' -f1-3); $runs runs each, medians of the runs without errors"
echo
echo "| workload (32 B lines) | servers | deliveries/s | vs plain | p50 | p99 | servers' CPU ms / M deliveries | Redis CPU ms / M deliveries | bus relay thread: on CPU / waiting for CPU | runs with errors; lines missing; Redis buffer overruns (all runs) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for w in "${workloads[@]}"; do
    name=${w%% *}
    base=$(median <"$tmp/rate.$name.plain" || true)
    for c in $configs; do
        rate=$(median <"$tmp/rate.$name.$c" || true); p50=$(median <"$tmp/p50.$name.$c" || true); p99=$(median <"$tmp/p99.$name.$c" || true)
        cpu=$(median <"$tmp/cpu.$name.$c" || true); rcpu=$(median <"$tmp/rcpu.$name.$c" || true)
        on=$(median <"$tmp/subon.$name.$c" || true); wait_=$(median <"$tmp/subwait.$name.$c" || true)
        case $c in plain) who="1, no bus" ;; bus1) who="1, bus" ;; *) who="${c#bus}, bus" ;; esac
        awk -v w="$(label "$name")" -v who="$who" -v r="$rate" -v b="$base" -v p50="$p50" -v p99="$p99" -v cpu="$cpu" -v rc="$rcpu" \
            -v on="$on" -v wt="$wait_" -v c="$c" -v er="$(cat "$tmp/errors.$name.$c")" -v mi="$(cat "$tmp/missing.$name.$c")" -v o="$(cat "$tmp/overruns.$name.$c")" 'BEGIN {
            if (r == "") { printf "| %s | %s | every run failed | | | | | | | %s; %s; %s |\n", w, who, er, mi, o; exit }
            printf "| %s | %s | %.2f M | %s | %.1f ms | %.1f ms | %.0f | %s | %s | %s; %s; %s |\n", w, who, r / 1e6,
                (b > 0 ? sprintf("%.2fx", r / b) : "-"), p50 / 1e3, p99 / 1e3, cpu,
                (c == "plain" ? "-" : sprintf("%.0f", rc)), (on == "" ? "-" : on "% / " wt "%"), er, mi, o }'
    done
done
echo
echo "Two servers, ramps (one run each; stops at the first step that loses lines, or whose p99 passes 1 s):"
echo
echo "| workload | lines/s sent | deliveries/s | p50 | p99 | errors | lines missing | Redis buffer overruns |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
cat "$tmp/ramp"
echo
best=$(sort -g "$tmp/lossless" | tail -1)
echo "Highest deliveries/s of any run over 2 or 3 servers with no error and nothing missing: $(awk -v b="${best:-0}" 'BEGIN { printf "%.2f M", b / 1e6 }')"
command -v redis-cli >/dev/null &&
    echo "Redis's pub/sub output buffer limit (hard, soft, seconds): $(redis-cli -p "$redis_port" config get client-output-buffer-limit | tail -1 | grep -o 'pubsub.*')"
