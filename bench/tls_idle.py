"""Opens N TLS connections to a server, one after another, each completing its handshake (the
server's certificate pinned by its SHA-256 fingerprint) and, with --greeting, reading the
server's first line; then leaves them all idle and reports the server's RSS (from
/proc/PID/status) before the first connection and with all N connected, as one line of JSON:

    python3 bench/tls_idle.py PORT N SERVER_PID sha256:HEX [--greeting]

    {"clients":2000,"connect_s":1.234,"rss_before_kib":2100,"rss_after_kib":80000,"per_client_kib":38.9}

Any connection that fails, or a certificate that is not the pinned one, ends it with status 1.
"""
import hashlib
import json
import resource
import socket
import ssl
import sys
import time


def rss_kib(pid):
    with open("/proc/%s/status" % pid) as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


def main():
    if len(sys.argv) not in (5, 6) or (len(sys.argv) == 6 and sys.argv[5] != "--greeting"):
        sys.exit(__doc__)
    port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    pin = sys.argv[4].lower().removeprefix("sha256:").replace(":", "")
    greeting = len(sys.argv) == 6

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n + 64:
        sys.exit("tls_idle: the fd limit (%d) is too low for %d connections" % (hard, n))
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    # Verification by the pin below, not by a chain: the benchmark's certificate is self-signed.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    before = rss_kib(pid)
    started = time.monotonic()
    clients = []
    for i in range(n):
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=20)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            seen = hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()
            if seen != pin:
                sys.exit("tls_idle: connection %d: certificate sha256:%s is not the pinned one" % (i, seen))
            if greeting:
                line = b""
                while not line.endswith(b"\n"):
                    chunk = tls.recv(1024)
                    if not chunk:
                        raise ConnectionError("closed before its greeting (%r so far)" % line)
                    line += chunk
        except (OSError, ConnectionError) as e:
            sys.exit("tls_idle: connection %d of %d failed: %s" % (i + 1, n, e))
        clients.append(tls)
    connect = time.monotonic() - started
    # Let the server finish with the last handshakes (in TLS 1.3 the server's side ends after the
    # client's) and settle before its RSS is read: a measurement, not a test.
    time.sleep(1)
    after = rss_kib(pid)
    print(json.dumps({
        "clients": n,
        "connect_s": round(connect, 3),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "per_client_kib": round((after - before) / n, 1),
    }, separators=(",", ":")))
    for c in clients:
        c.close()


if __name__ == "__main__":
    main()
