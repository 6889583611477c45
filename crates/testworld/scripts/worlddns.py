"""Authoritative DNS server for the test world's `.test` zones.

portcullis-testworld embeds this script, writes it to the run directory and runs
it with Debian's /usr/bin/python3 (package python3-dnslib) inside the world
network namespace:

    worlddns.py --zone ZONE.json --log dns.log --ready dns.ready \
        --parent PID --lifetime SECONDS --listen 198.51.100.53 --listen 2001:db8::53

It answers for `test.` and everything below it, from the zone description
that the Rust `Zone` builder wrote:

    {"records":   [{"name": "a.test", "type": "A", "ttl": 60, "data": "198.51.100.10"}, ...],
     "generated": [{"suffix": "gen.test", "ttl": 30}, ...],
     "truncated": ["big.test", ...],
     "delayed":   {"slow.test": 2500, ...},
     "servfail":  ["broken.test", ...],
     "garbage":   ["noise.test", ...]}

Faults, for tests of what a resolver does with a bad upstream: a `delayed`
name is answered normally, but only after the given number of milliseconds
(other queries are not held up meanwhile); a `servfail` name gets SERVFAIL
with no records; a `garbage` name gets, over UDP, a datagram of random bytes
followed by its real answer under a wrong message ID, and over TCP a
length-prefixed message of random bytes (then the connection closes).

Names outside `.test` get REFUSED, unknown names under it NXDOMAIN. Every query
is logged, one line each ("qname qtype transport source", qname in lower case
without the trailing dot), flushed before the answer is sent, so a test that
got its answer can read the line at once.

The server stops by itself when its parent (the test process) is gone or after
--lifetime seconds, whichever comes first.
"""

import argparse
import ipaddress
import json
import os
import socket
import struct
import sys
import threading
import time

from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord

# Longest CNAME chain followed inside one answer; a resolver follows the rest.
MAX_CHAIN = 16
# Negative answers carry this SOA (its last field is the negative-caching TTL).
SOA_RECORD = RR(
    "test.", QTYPE.SOA, ttl=30,
    rdata=SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, 30)),
)
TCP_IDLE_TIMEOUT = 10.0
GENERATED_V4_BASE = 20
GENERATED_V6_BASE = int(ipaddress.IPv6Address("2001:db8:1::"))


def normalize(name):
    """Lower case, no trailing dot: the form used for lookups and the log."""
    return str(name).rstrip(".").lower()


def under_test(name):
    return name == "test" or name.endswith(".test")


def generated_v4(k):
    return "198.51.100.%d" % (k % 200 + GENERATED_V4_BASE)


def generated_v6(k):
    return str(ipaddress.IPv6Address(GENERATED_V6_BASE + k))


class Zone:
    def __init__(self, description):
        self.records = {}
        for record in description["records"]:
            entry = (record["type"], record["ttl"], record["data"])
            self.records.setdefault(record["name"], []).append(entry)
        self.generated = {g["suffix"]: g["ttl"] for g in description["generated"]}
        self.truncated = set(description["truncated"])
        self.delayed = {name: ms / 1000.0 for name, ms in description.get("delayed", {}).items()}
        self.servfail = set(description.get("servfail", []))
        self.garbage = set(description.get("garbage", []))
        # Names that own no record but have descendants exist (NODATA, not NXDOMAIN).
        self.nonterminals = set()
        for name in list(self.records) + list(self.generated):
            labels = name.split(".")
            for i in range(1, len(labels)):
                self.nonterminals.add(".".join(labels[i:]))

    def lookup(self, name):
        """The records of `name` as (type, ttl, data), or None if it does not exist."""
        if name in self.records:
            return self.records[name]
        first, _, suffix = name.partition(".")
        ttl = self.generated.get(suffix)
        if ttl is not None and len(first) > 1 and first[0] == "n" and first[1:].isdigit():
            k = int(first[1:])
            if k < 2**64:
                return [("A", ttl, generated_v4(k)), ("AAAA", ttl, generated_v6(k))]
        if name in self.nonterminals or name == "test":
            return []
        return None

    def resolve(self, qname, qtype):
        """Return (rcode, [(owner, type, ttl, data)], negative) for a question under .test.

        `negative` is true when the last name of the chain has no record of the
        asked type (NXDOMAIN or NODATA): the answer then carries the SOA.
        """
        answers = []
        name = qname
        seen = set()
        for _ in range(MAX_CHAIN):
            records = self.lookup(name)
            if records is None:
                return RCODE.NXDOMAIN, answers, True
            cnames = [r for r in records if r[0] == "CNAME"]
            if cnames and qtype != "CNAME":
                rtype, ttl, target = cnames[0]
                answers.append((name, rtype, ttl, target))
                seen.add(name)
                # A loop or a target outside our zone ends the chain here; the
                # resolver asking gets the CNAMEs so far and does the rest.
                if target in seen or not under_test(target):
                    return RCODE.NOERROR, answers, False
                name = target
                continue
            found = [(name, rtype, ttl, data) for rtype, ttl, data in records
                     if rtype == qtype or qtype == "ANY"]
            if name == "test" and qtype in ("SOA", "ANY"):
                found.append(("test", "SOA", None, None))
            return RCODE.NOERROR, answers + found, not found
        return RCODE.NOERROR, answers, False


def make_rr(owner, rtype, ttl, data):
    if rtype == "SOA":
        return SOA_RECORD
    if rtype == "A":
        rdata = A(data)
    elif rtype == "AAAA":
        rdata = AAAA(data)
    elif rtype == "CNAME":
        rdata = CNAME(data + ".")
    elif rtype == "TXT":
        raw = data.encode()
        rdata = TXT([raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""])
    else:
        raise ValueError("unsupported record type " + rtype)
    return RR(owner + ".", getattr(QTYPE, rtype), ttl=ttl, rdata=rdata)


class Server:
    def __init__(self, zone, log_path):
        self.zone = zone
        self.log_lock = threading.Lock()
        self.log = open(log_path, "a", encoding="utf-8")

    def log_query(self, qname, qtype, transport, source):
        with self.log_lock:
            self.log.write("%s %s %s %s\n" % (qname or ".", qtype, transport, source))
            self.log.flush()

    def respond(self, data, transport, source):
        """(delay in seconds, [wire-format messages to send]) for one query."""
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return 0, []
        if request.header.qr or not request.questions:
            return 0, []
        qname = normalize(request.q.qname)
        wire = self.answer(request, transport, source)
        if qname in self.zone.garbage:
            noise = os.urandom(37)
            if transport == "tcp":
                return 0, [noise]
            wrong_id = struct.pack("!H", (request.header.id + 1) & 0xFFFF) + wire[2:]
            return 0, [noise, wrong_id]
        return self.zone.delayed.get(qname, 0), [wire]

    def answer(self, request, transport, source):
        """The wire-format reply to one parsed query."""
        question = request.q
        qname = normalize(question.qname)
        qtype = QTYPE[question.qtype]
        self.log_query(qname, qtype, transport, source)

        reply = request.reply(ra=0, aa=1)
        reply.header.ad = 0
        edns = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
        if qname in self.zone.servfail:
            reply.header.aa = 0
            reply.header.rcode = RCODE.SERVFAIL
        elif not under_test(qname):
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
        else:
            rcode, answers, negative = self.zone.resolve(qname, qtype)
            reply.header.rcode = rcode
            for i, (owner, rtype, ttl, rdata) in enumerate(answers):
                # The first record keeps the question's spelling (0x20 case).
                rr = make_rr(owner, rtype, ttl, rdata)
                if i == 0 and rtype != "SOA":
                    rr.rname = question.qname
                reply.add_answer(rr)
            if negative:
                reply.add_auth(SOA_RECORD)
        if edns:
            reply.add_ar(EDNS0(udp_len=1232))

        if transport == "udp":
            limit = max(512, edns[0].rclass) if edns else 512
            wire = reply.pack()
            if qname in self.zone.truncated or len(wire) > limit:
                reply.rr = []
                reply.auth = []
                reply.ar = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
                reply.header.tc = 1
        return reply.pack()

    def serve_udp(self, sock):
        def send(wires, peer):
            for wire in wires:
                sock.sendto(wire, peer)

        while True:
            try:
                data, peer = sock.recvfrom(65535)
                delay, wires = self.respond(data, "udp", peer[0])
                if delay > 0:
                    timer = threading.Timer(delay, send, args=(wires, peer))
                    timer.daemon = True
                    timer.start()
                else:
                    send(wires, peer)
            except Exception as err:  # keep serving; a test sees the failure
                print("udp:", err, file=sys.stderr, flush=True)

    def serve_tcp(self, listener):
        while True:
            try:
                conn, peer = listener.accept()
            except OSError as err:
                print("accept:", err, file=sys.stderr, flush=True)
                time.sleep(0.1)
                continue
            threading.Thread(target=self.serve_tcp_conn, args=(conn, peer), daemon=True).start()

    def serve_tcp_conn(self, conn, peer):
        with conn:
            conn.settimeout(TCP_IDLE_TIMEOUT)
            try:
                while True:
                    header = recv_exact(conn, 2)
                    if header is None:
                        return
                    data = recv_exact(conn, struct.unpack("!H", header)[0])
                    if data is None:
                        return
                    delay, wires = self.respond(data, "tcp", peer[0])
                    if not wires:
                        return
                    time.sleep(delay)
                    for wire in wires:
                        conn.sendall(struct.pack("!H", len(wire)) + wire)
                    if normalize(DNSRecord.parse(data).q.qname) in self.zone.garbage:
                        return
            except OSError:
                return
            except Exception as err:  # keep serving; a test sees the failure
                print("tcp:", err, file=sys.stderr, flush=True)


def recv_exact(conn, size):
    chunks = b""
    while len(chunks) < size:
        chunk = conn.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return chunks


def bind(address, kind):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, 53))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zone", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--lifetime", type=float, required=True)
    parser.add_argument("--listen", action="append", required=True)
    args = parser.parse_args()

    with open(args.zone, encoding="utf-8") as f:
        server = Server(Zone(json.load(f)), args.log)
    for address in args.listen:
        udp = bind(address, socket.SOCK_DGRAM)
        tcp = bind(address, socket.SOCK_STREAM)
        threading.Thread(target=server.serve_udp, args=(udp,), daemon=True).start()
        threading.Thread(target=server.serve_tcp, args=(tcp,), daemon=True).start()
    with open(args.ready, "w", encoding="utf-8") as f:
        f.write("%d\n" % os.getpid())

    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline and os.getppid() == args.parent:
        time.sleep(0.2)
    os._exit(0)


if __name__ == "__main__":
    main()
