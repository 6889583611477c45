"""Far-side servers of the test world: TCP, UDP and HTTP "hello" servers.

portcullis-testworld embeds this script, writes it to the run directory and runs
it with /usr/bin/python3 inside the world network namespace:

    worldserve.py --mode tcp|udp|http --port PORT --line TEXT --ready FILE \
        --parent PID --lifetime SECONDS

It listens on 0.0.0.0 and :: (two sockets, IPv6-only on the second). The world
owns 198.51.100.0/24 and 2001:db8::/48 as local routes, so every address in
them answers:

- tcp: each connection gets TEXT, then the server drains what the client sent
  and closes (closing with unread data would reset the connection).
- udp: each datagram gets TEXT back, sent from the address it was sent to
  (IP_PKTINFO), so connected UDP clients accept it.
- http: every GET or HEAD gets 200 with TEXT as the body.

The server stops by itself when its parent (the test process) is gone or after
--lifetime seconds, whichever comes first.
"""

import argparse
import http.server
import os
import socket
import struct
import sys
import threading
import time

# Linux value; Python's socket module does not export it.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
DRAIN_TIMEOUT = 2.0


def listener(family, kind, port):
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::", port))
    else:
        sock.bind(("0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


def serve_tcp(sock, line):
    while True:
        try:
            conn, _ = sock.accept()
        except OSError as err:
            print("accept:", err, file=sys.stderr, flush=True)
            time.sleep(0.1)
            continue
        threading.Thread(target=tcp_conn, args=(conn, line), daemon=True).start()


def tcp_conn(conn, line):
    with conn:
        try:
            conn.sendall(line)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(DRAIN_TIMEOUT)
            while conn.recv(65536):
                pass
        except OSError:
            pass


def serve_udp(sock, family, line):
    # Reply from the address the datagram was sent to: a wildcard socket would
    # otherwise answer from the world's link address (203.0.113.2).
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    while True:
        try:
            _, ancillary, _, peer = sock.recvmsg(65535, socket.CMSG_SPACE(32))
            reply_info = []
            for level, kind, data in ancillary:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    _, _, destination = struct.unpack("I4s4s", data[:12])
                    info = struct.pack("I4s4s", 0, destination, b"\0" * 4)
                    reply_info = [(socket.IPPROTO_IP, IP_PKTINFO, info)]
                elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                    destination, _ = struct.unpack("16sI", data[:20])
                    info = struct.pack("16sI", destination, 0)
                    reply_info = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)]
            sock.sendmsg([line], reply_info, 0, peer)
        except OSError as err:
            print("udp:", err, file=sys.stderr, flush=True)


def serve_http(sock, family, line):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(line)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(line)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

        def server_bind(self):
            # The socket is already bound (IPv6-only where needed).
            self.server_address = self.socket.getsockname()

        def server_activate(self):
            pass

    server = Server(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["tcp", "udp", "http"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--line", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--lifetime", type=float, required=True)
    args = parser.parse_args()
    line = args.line.encode()

    kind = socket.SOCK_DGRAM if args.mode == "udp" else socket.SOCK_STREAM
    for family in (socket.AF_INET, socket.AF_INET6):
        sock = listener(family, kind, args.port)
        if args.mode == "tcp":
            target, targs = serve_tcp, (sock, line)
        elif args.mode == "udp":
            target, targs = serve_udp, (sock, family, line)
        else:
            target, targs = serve_http, (sock, family, line)
        threading.Thread(target=target, args=targs, daemon=True).start()
    with open(args.ready, "w", encoding="utf-8") as f:
        f.write("%d\n" % os.getpid())

    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline and os.getppid() == args.parent:
        time.sleep(0.2)
    os._exit(0)


if __name__ == "__main__":
    main()
