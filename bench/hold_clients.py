"""Connects N clients one after another to a server, reads each greeting, sends each one line,
then reports the connect time and the server's RSS per client (from /proc/PID/status).

    python3 bench/hold_clients.py PORT N SERVER_PID
"""
import resource
import socket
import sys
import time

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

started = time.time()
clients = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(n)]
connect = time.time() - started
for c in clients:
    c.recv(100)
for i, c in enumerate(clients):
    c.sendall(b"client %d here\n" % i)
time.sleep(2)  # let the server print every line before RSS is read (a measurement, not a test)
with open("/proc/%s/status" % pid) as status:
    rss = next(int(l.split()[1]) for l in status if l.startswith("VmRSS"))
print("clients %d  connect %.3f s  server RSS %d KiB (%.1f KiB per client)"
      % (n, connect, rss, rss / n))
