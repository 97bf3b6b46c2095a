#!/usr/bin/env python3
"""Connects N clients to a chat server (`server --mode chat`, or `ncat -l -k --chat`), reads each
greeting, reports the server's RSS per client; then one client sends one line, and the time until
every other client has it is measured.

    python3 bench/chat_clients.py PORT N SERVER_PID
"""
import resource, select, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def rss():
    with open("/proc/%s/status" % pid) as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
base = rss()
t = time.time()
clients = []
for i in range(n):
    c = socket.create_connection(("127.0.0.1", port), timeout=20)
    clients.append(c)
for c in clients:
    data = b""
    while not data.endswith(b"\n"):
        data += c.recv(100)
connect = time.time() - t
time.sleep(1)  # a measurement: let the server settle before RSS is read
r = rss()
print("clients %d  connect+greet %.3f s  RSS %d KiB (%.1f KiB per client, %d KiB before)" % (n, connect, r, (r - base) / n, base))
for c in clients: c.setblocking(False)
ep = select.epoll()
for i, c in enumerate(clients[1:]): ep.register(c.fileno(), select.EPOLLIN)
fd2 = {c.fileno(): c for c in clients[1:]}
got = {}
t = time.time()
clients[0].sendall(b"hello everyone\n")
waiting = set(fd2)
while waiting and time.time() - t < 10:
    for fd, ev in ep.poll(1):
        data = fd2[fd].recv(4096)
        got[fd] = got.get(fd, b"") + data
        if got[fd].endswith(b"\n"):
            waiting.discard(fd); ep.unregister(fd)
print("one line to %d others: %.3f s, %d missing" % (n - 1, time.time() - t, len(waiting)))
