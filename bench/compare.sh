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
# TLS, with one ECDSA P-256 certificate made here with openssl and served by both plugboard
# (--tls-cert/--tls-key) and `ncat --ssl --ssl-cert --ssl-key`; the load client pins it with
# --tls-fingerprint (the certificate is self-signed with CA:TRUE, which rustls refuses as an end
# entity under --tls-ca):
#   7. TLS ingest: as 1., into `server --tls-cert ...` against `ncat --ssl -l -k` (goal: 1.0x);
#   8. echo round trip over TLS, as 2. (same CPU pinning): `server --mode echo --tls-cert ...`,
#      against plugboard's plaintext echo in the same run and against `ncat --ssl -l -k -e
#      /bin/cat` (ncat decrypts, pipes each connection through its own cat, encrypts the echo);
#   9. TLS handshakes per second: each connection connects, handshakes, sends one line, half-closes
#      and waits for the server's close; rate = connections / the client's elapsed_s. ncat listens
#      with a backlog of 10 (hard-coded), so a burst of more connects overflows its accept queue:
#      the kernel drops the overflow's SYNs and the clients retry after 1 s, 3 s, ..., which times
#      the retransmission timer, not the server (1,000 at once: ~20% of connections time out after
#      5 s). So the comparison is in bursts of 10 (one `client --connections 10 --count 1` after
#      another, 50 per run: 500 handshakes, none overflowing), plus plugboard alone with 1,000
#      connecting at once (backlog 4096). Full handshakes for plugboard, which sends no session
#      tickets; ncat does, so a late connection of a burst might resume, which can only flatter it;
#  10. RSS per idle TLS client: bench/tls_idle.py opens 2,000 TLS connections to plugboard one after
#      another, each handshaking and reading the greeting, then idle; (RSS with them - RSS before)
#      / 2,000, from /proc/PID/status (goal: at most 48 KiB). ncat the same way but with 1,000
#      (-m 1000): it select()s, and aborts at a descriptor of 1024 or more.
# Runs of plugboard and its peer alternate, so a noisy machine hurts both alike.
# Usage: bench/compare.sh [RUNS]   (default 5 runs per workload)
#        ONLY=tls bench/compare.sh [RUNS]   only the TLS workloads, 7-10 (skips 1-6)
#        SKIP_SCALE=1 bench/compare.sh      all but the 10,000-client tests (3. and 6.)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
only=${ONLY:-}
case $only in
    "" | tls) ;;
    *) echo "ONLY=$only: the only subset is ONLY=tls" >&2; exit 2 ;;
esac

if ! command -v ncat >/dev/null; then
    apt-get update -qq && apt-get install -y -qq ncat >/dev/null
fi
if ! command -v openssl >/dev/null; then
    apt-get update -qq && apt-get install -y -qq openssl >/dev/null
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
        kill -0 "${pids[-1]}" 2>/dev/null || break # exited: no use waiting
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

ingest=(--connections 8 --count 200000 --interval 0 --size 64 --json -q)
: >"$tmp/ingest.plugboard"; : >"$tmp/ingest.ncat"
: >"$tmp/rtt.plugboard"; : >"$tmp/rtt.floor"; : >"$tmp/push"
plain_runs=$runs; [ "$only" != tls ] || plain_runs=0
for run in $(seq "$plain_runs"); do
    echo "run $run of $runs" >&2
    start server "$server" --port 0
    $client --port "$port" "${ingest[@]}" | json messages_per_s >>"$tmp/ingest.plugboard"
    stop_last
    start_ncat
    $client --port "$port" "${ingest[@]}" | json messages_per_s >>"$tmp/ingest.ncat"
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
    $client --port "$port" "${ingest[@]}" | json messages_per_s >>"$tmp/push"
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
# --- TLS (7-10) ---
cert=$tmp/cert.pem key=$tmp/key.pem
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$key" -out "$cert" \
    -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>"$tmp/openssl.err" ||
    { echo "openssl could not make the certificate" >&2; cat "$tmp/openssl.err" >&2; exit 1; }
# `sha256 Fingerprint=AB:CD:...` (OpenSSL 3; `SHA256 Fingerprint=` before): the client takes the colon form.
pin=sha256:$(openssl x509 -noout -fingerprint -sha256 -in "$cert" | cut -d= -f2)
[[ $pin =~ ^sha256:([0-9A-F]{2}:){31}[0-9A-F]{2}$ ]] || { echo "unexpected fingerprint: $pin" >&2; exit 1; }
tls=(--tls-cert "$cert" --tls-key "$key")
# Runs a command with its soft limit on open files raised to the hard one (exec: same PID, so it can
# be started in the background and killed). plugboard raises its own; python and ncat don't.
# shellcheck disable=SC2016 # expanded by that sh
fds=(sh -c 'ulimit -n "$(ulimit -Hn)" && exec "$@"' fds)
idle_n=2000 idle_ncat_n=1000 hs_burst=10 hs_bursts=50 hs_wide=1000
[ "$(ulimit -Hn)" -ge $((idle_n + 100)) ] ||
    { echo "open-file limit $(ulimit -Hn) is too low for $idle_n TLS clients (raise it: ulimit -n)" >&2; exit 1; }

# start_ncat_tls [--cpu0] NCAT-ARGS...: `ncat --ssl -l -k NCAT-ARGS...` with the benchmark's
# certificate on a free port, stdin held open (fd 3); with --cpu0 pinned to CPU 0, as the echo
# servers are.
start_ncat_tls() {
    local on=()
    if [ "${1:-}" = --cpu0 ]; then on=(taskset -c 0); shift; fi
    port=$(free_port)
    "${fds[@]}" "${on[@]}" ncat --ssl --ssl-cert "$cert" --ssl-key "$key" -l -k "$@" 127.0.0.1 "$port" \
        <&3 >/dev/null 2>"$tmp/ncat.err" &
    pids+=($!)
    for _ in $(seq 200); do
        ss -ltn "sport = :$port" | grep -q LISTEN && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || break
        sleep 0.05
    done
    echo "ncat --ssl${*:+ $*} did not start" >&2; cat "$tmp/ncat.err" >&2; exit 1
}
# load NAME FIELD FILE CMD...: runs the load client CMD (--json -q appended) and appends FIELD of its
# summary to FILE; a run with errors, or no summary, stops the benchmark with what the client said.
load() {
    local name=$1 field=$2 file=$3 out value; shift 3
    out=$("$@" --json -q 2>"$tmp/load.err") || true
    value=$(echo "$out" | json "$field" || true)
    if [ -z "$value" ] || [ "$(echo "$out" | json errors || true)" != 0 ]; then
        echo "$name failed: ${out:-no summary}" >&2; cat "$tmp/load.err" >&2; exit 1
    fi
    echo "$value" >>"$file"
}
# handshakes NAME FILE: hs_bursts bursts of hs_burst connections (connect, handshake, one line,
# close) against the server last started; appends connections per second over all the bursts.
handshakes() {
    local name=$1 file=$2
    : >"$tmp/bursts"
    for _ in $(seq "$hs_bursts"); do
        load "$name" elapsed_s "$tmp/bursts" "$client" --port "$port" --tls-fingerprint "$pin" --connections "$hs_burst" --count 1
    done
    awk -v n=$((hs_burst * hs_bursts)) '{ t += $1 } END { print n / t }' "$tmp/bursts" >>"$file"
}
# idle NAME FILE N [--greeting]: N idle TLS clients on the server last started (bench/tls_idle.py);
# appends the server's RSS growth per client in KiB.
idle() {
    local name=$1 file=$2 n=$3 out; shift 3
    out=$("${fds[@]}" python3 bench/tls_idle.py "$port" "$n" "${pids[-1]}" "$pin" "$@" 2>&1) ||
        { echo "$n idle TLS clients on $name failed: $out" >&2; exit 1; }
    echo "$out" | json per_client_kib >>"$file"
}

ingest_tls=(--connections 8 --count 200000 --interval 0 --size 64) # as 1. and 2.; load adds --json -q
rtt=(--rtt --count 20000 --interval 0 --size 64)
for f in ingest rtt hs rss; do : >"$tmp/tls_$f.plugboard"; : >"$tmp/tls_$f.ncat"; done
: >"$tmp/tls_rtt.plain"; : >"$tmp/tls_hs.wide"
for run in $(seq "$runs"); do
    echo "TLS run $run of $runs" >&2
    start tls-server "$server" --port 0 "${tls[@]}"
    load "TLS ingest into plugboard" messages_per_s "$tmp/tls_ingest.plugboard" "$client" --port "$port" --tls-fingerprint "$pin" "${ingest_tls[@]}"
    stop_last
    start_ncat_tls
    load "TLS ingest into ncat" messages_per_s "$tmp/tls_ingest.ncat" "$client" --port "$port" --tls-fingerprint "$pin" "${ingest_tls[@]}"
    stop_last

    # Pinned as in 2.: servers on CPU 0 (ncat's relay and cat too), the client on CPU 1.
    start tls-echo taskset -c 0 "$server" --port 0 --mode echo "${tls[@]}"
    load "TLS echo on plugboard" p50 "$tmp/tls_rtt.plugboard" taskset -c 1 "$client" --port "$port" --tls-fingerprint "$pin" "${rtt[@]}"
    stop_last
    start echo taskset -c 0 "$server" --port 0 --mode echo
    load "plaintext echo on plugboard" p50 "$tmp/tls_rtt.plain" taskset -c 1 "$client" --port "$port" "${rtt[@]}"
    stop_last
    start_ncat_tls --cpu0 -e /bin/cat
    load "TLS echo on ncat -e /bin/cat" p50 "$tmp/tls_rtt.ncat" taskset -c 1 "$client" --port "$port" --tls-fingerprint "$pin" "${rtt[@]}"
    stop_last

    start tls-server "$server" --port 0 "${tls[@]}"
    handshakes "TLS handshakes with plugboard" "$tmp/tls_hs.plugboard"
    load "$hs_wide TLS handshakes at once with plugboard" elapsed_s "$tmp/tls_hs.wide" "$client" --port "$port" --tls-fingerprint "$pin" --connections "$hs_wide" --count 1
    stop_last
    start_ncat_tls
    handshakes "TLS handshakes with ncat" "$tmp/tls_hs.ncat"
    stop_last

    start tls-server "$server" --port 0 "${tls[@]}"
    idle plugboard "$tmp/tls_rss.plugboard" "$idle_n" --greeting
    stop_last
    start_ncat_tls -m "$idle_ncat_n"
    idle ncat "$tmp/tls_rss.ncat" "$idle_ncat_n" # ncat sends no greeting
    stop_last
done

if [ "$only" != tls ]; then
    chat_scale=${SKIP_SCALE:+skipped}; [ -n "$chat_scale" ] || chat_scale=$(cargo test --release --quiet --test suite scale::ten_thousand_chat -- --ignored --nocapture 2>/dev/null | grep 'chat clients: ' || true)

    scale=${SKIP_SCALE:+skipped}; [ -n "$scale" ] || scale=$(cargo test --release --quiet --test suite scale::ten_thousand_clients -- --ignored --nocapture 2>/dev/null | grep 'clients: ' || true)
fi

echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), Linux $(uname -r); $runs runs each, medians"
echo
echo "| workload | plugboard | peer | ratio |"
echo "| --- | --- | --- | --- |"
if [ "$only" != tls ]; then
    ip=$(median <"$tmp/ingest.plugboard"); in=$(median <"$tmp/ingest.ncat")
    rp=$(median <"$tmp/rtt.plugboard"); rf=$(median <"$tmp/rtt.floor")
    push=$(median <"$tmp/push")
    awk -v p="$ip" -v n="$in" 'BEGIN { printf "| ingest, 8 x 200,000 lines of 64 B (lines/s) | %.2f M | ncat -l -k: %.2f M | %.2fx (higher is better) |\n", p/1e6, n/1e6, p/n }'
    awk -v p="$rp" -v f="$rf" 'BEGIN { printf "| echo round trip, 64 B, p50 | %.1f us | std-only echo floor: %.1f us | %.3fx (lower is better) |\n", p, f, p/f }'
    awk -v c="$push" -v p="$ip" 'BEGIN { printf "| one load client into a reader that only reads (lines/s) | %.2f M | server ingest: %.2f M | %.2fx client headroom |\n", c/1e6, p/1e6, c/p }'
    for size in $chat_sizes; do
        cp=$(median <"$tmp/chat.$size.plugboard"); cn=$(median <"$tmp/chat.$size.ncat")
        tp=$(median <"$tmp/cpu.$size.plugboard"); tn=$(median <"$tmp/cpu.$size.ncat")
        awk -v s="$size" -v p="$cp" -v n="$cn" -v tp="$tp" -v tn="$tn" 'BEGIN { printf "| chat %s, 32 B lines (deliveries/s; server CPU ticks per M deliveries) | %.2f M; %.1f | ncat --chat: %.2f M; %.1f | %.2fx throughput, %.2fx CPU (lower is better) |\n", s, p/1e6, tp, n/1e6, tn, (n > 0 ? p/n : 0), (tn > 0 ? tp/tn : 0) }'
    done
fi
tip=$(median <"$tmp/tls_ingest.plugboard"); tin=$(median <"$tmp/tls_ingest.ncat")
trp=$(median <"$tmp/tls_rtt.plugboard"); trc=$(median <"$tmp/tls_rtt.plain"); trn=$(median <"$tmp/tls_rtt.ncat")
thp=$(median <"$tmp/tls_hs.plugboard"); thn=$(median <"$tmp/tls_hs.ncat"); thw=$(median <"$tmp/tls_hs.wide")
tsp=$(median <"$tmp/tls_rss.plugboard"); tsn=$(median <"$tmp/tls_rss.ncat")
awk -v p="$tip" -v n="$tin" 'BEGIN { printf "| TLS ingest, 8 x 200,000 lines of 64 B (lines/s) | %.2f M | ncat --ssl -l -k: %.2f M | %.2fx (higher is better; goal 1.0x) |\n", p/1e6, n/1e6, p/n }'
awk -v p="$trp" -v c="$trc" -v n="$trn" 'BEGIN { printf "| echo round trip over TLS, 64 B, p50 | %.1f us (plaintext: %.1f us, %.2fx) | ncat --ssl -e /bin/cat: %.1f us | %.2fx (lower is better) |\n", p, c, p/c, n, p/n }'
awk -v p="$thp" -v n="$thn" -v b="$hs_burst" -v k="$hs_bursts" 'BEGIN { printf "| TLS handshakes (connect, handshake, one line, close) in %d bursts of %d (per s) | %.0f | ncat --ssl -l -k: %.0f | %.2fx (higher is better; goal 1.0x) |\n", k, b, p, n, p/n }'
awk -v e="$thw" -v w="$hs_wide" 'BEGIN { printf "| TLS handshakes, %d connecting at once (per s) | %.0f | ncat: listen backlog 10, connects time out | |\n", w, w/e }'
awk -v p="$tsp" -v n="$tsn" -v pn="$idle_n" -v nn="$idle_ncat_n" 'BEGIN { printf "| RSS per idle TLS client (handshake done, greeting read) | %.1f KiB (%d clients; goal 48) | ncat --ssl: %.1f KiB (%d clients) | %.2fx (lower is better) |\n", p, pn, n, nn, p/n }'
if [ "$only" != tls ]; then
    echo
    echo "10,000 clients: ${scale:-not measured}"
    echo "10,000 chat clients: ${chat_scale:-not measured}"
fi
