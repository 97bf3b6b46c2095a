"""The peer for the 10,000-client comparison: Python's socketserver.ThreadingTCPServer, the same
thread-per-connection design as plugboard, doing the same work (greet, print each line with the
client's address). Prints `listening on ADDR` on stderr.

    python3 bench/py_threading_server.py > /dev/null
"""
import resource
import socketserver
import sys

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"welcome\n")
        for line in self.rfile:
            sys.stdout.write("%s:%d %s" % (*self.client_address, line.decode(errors="replace")))


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True


server = Server(("127.0.0.1", 0), Handler)
print("listening on 127.0.0.1:%d" % server.server_address[1], file=sys.stderr, flush=True)
server.serve_forever()
