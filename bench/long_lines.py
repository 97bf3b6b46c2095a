"""Server memory with long lines: what clients hold once quiet, and the worst case the budget bounds.

    python3 bench/long_lines.py PORT SERVER_PID quiet 1000       # each sends a 65,000-byte line
    python3 bench/long_lines.py PORT SERVER_PID unfinished 10000 # each holds 65,000 bytes, no newline

`quiet`: N clients each send one 65,000-byte line and stay connected; prints the server's RSS
growth per client at once and after 1, 2 and 3 s (buffers go back to their small size after a
second of quiet). `unfinished`: N clients each send 65,000 bytes without a newline and stay; prints
the RSS growth and how many the server refused (`error: server busy (buffers full)`).
Start the server first, e.g. `target/release/server --port 0 >/dev/null`.
"""

import resource
import socket
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for {pid}")


def main():
    port, pid, mode, clients = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    limit = clients + 100
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
    before = rss_kib(pid)
    socks = []
    payload = b"y" * 65000 + b"\n" if mode == "quiet" else b"z" * 65000
    for _ in range(clients):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        try:
            sock.send(payload)
        except BlockingIOError:
            pass
        socks.append(sock)
    per_client = lambda: (rss_kib(pid) - before) / clients
    if mode == "quiet":
        print(f"{clients} clients, each sent a 65,000-byte line: {per_client():.1f} KiB each at once")
        for second in (1, 2, 3):
            time.sleep(1)
            print(f"  after {second} s: {per_client():.1f} KiB each")
    else:
        time.sleep(2)
        refused = 0
        for sock in socks:
            try:
                if b"buffers full" in sock.recv(4096):
                    refused += 1
            except OSError:
                pass
        grown = (rss_kib(pid) - before) / 1024
        print(f"{clients} clients holding 65,000 unfinished bytes: RSS grew {grown:.0f} MiB, {refused} refused")


main()
