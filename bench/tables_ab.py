#!/usr/bin/python3
"""Scratch A/B behind docs/benchmarks.md "Many sandboxes on one host": new connections/s
(wrk, Connection: close) on bench/run's masquerade-only path, without and with K other
sandboxes' rules in the uplink, interleaved per round. Builds bench/run's topology itself.

usage: sudo bench/tables_ab.py ROUNDS K MODE [SECS]
MODE: tables (K copies of a sandbox's inet table, as today), filter (their forward, input
and output chains only), nat (their NAT chains only), vmap (one table, one forward base
chain dispatching to K sandboxes' chains through iifname/oifname vmaps), conntrack (K is
ignored: the unfiltered, routed path, without and with a forward chain whose one rule,
`ct state established,related accept`, turns conntrack on: what any stateful filter costs
before its first rule of its own), sandboxes (K real `portcullis run -- sleep` sandboxes in the
uplink, each on its own link; K <= 32, the bench's /25 pool of /30 blocks), network (K real
sandboxes on one network, a bridge: K <= 120). The last two need the release build."""
import importlib.machinery, importlib.util, re, signal, statistics, subprocess, sys, time

rounds, K, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
secs = sys.argv[4] if len(sys.argv) > 4 else "4"
loader = importlib.machinery.SourceFileLoader("benchrun", sys.path[0] + "/run")
spec = importlib.util.spec_from_loader("benchrun", loader)
br = importlib.util.module_from_spec(spec)
sys.argv = ["bench/run", "--only", "dataplane", "--rounds", "1", "--no-build"]
loader.exec_module(br)

CHAINS = {
    "nat": """	chain dns_redirect {
		type nat hook prerouting priority dstnat - 10; policy accept;
		iifname "@IF@" meta nfproto ipv4 udp dport 53 dnat ip to 203.0.113.125:5353
		iifname "@IF@" meta nfproto ipv4 tcp dport 53 dnat ip to 203.0.113.125:5353
		iifname "@IF@" meta nfproto ipv6 udp dport 53 dnat ip6 to [2001:db8:fff9::1]:5353
		iifname "@IF@" meta nfproto ipv6 tcp dport 53 dnat ip6 to [2001:db8:fff9::1]:5353
	}
	chain source_nat {
		type nat hook postrouting priority srcnat; policy accept;
		oifname != "@IF@" ip saddr 203.0.113.126 masquerade
		oifname != "@IF@" ip6 saddr 2001:db8:fff9::2 masquerade
	}
""",
    "filter": """	chain host_input {
		type filter hook input priority filter; policy accept;
		iifname != "@IF@" return
		counter name blocked drop
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "@IF@" jump egress
		oifname "@IF@" ct state established,related accept
		oifname "@IF@" counter name blocked drop
	}
	chain host_output {
		type filter hook output priority filter; policy accept;
		oifname != "@IF@" return
		ct state established,related accept
		counter drop
	}
	chain egress {
		ct state established,related accept
		ip daddr @allow4 accept
		counter name blocked drop
	}
""",
}
HEAD = """	set allow4 { type ipv4_addr; flags timeout; }
	counter blocked { }
"""


def ruleset():
    if mode == "conntrack":
        return ("table inet pcab0 {\n\tchain forward {\n"
                "\t\ttype filter hook forward priority filter; policy accept;\n"
                "\t\tct state established,related accept\n\t}\n}\n")
    if mode == "vmap":
        chains = "".join(f"""	chain e{i} {{
		ct state established,related accept
		ip daddr @allow4 accept
		counter name blocked drop
	}}
	chain r{i} {{
		ct state established,related accept
		counter name blocked drop
	}}
""" for i in range(K))
        iv = ", ".join(f'"pd-{i}" : jump e{i}' for i in range(K))
        ov = ", ".join(f'"pd-{i}" : jump r{i}' for i in range(K))
        return (f"table inet pcab0 {{\n{HEAD}{chains}\tchain forward {{\n"
                "\t\ttype filter hook forward priority filter; policy accept;\n"
                f"\t\tiifname vmap {{ {iv} }}\n\t\toifname vmap {{ {ov} }}\n\t}}\n}}\n")
    body = {"tables": CHAINS["nat"] + CHAINS["filter"]}.get(mode) or CHAINS[mode]
    return "".join(f"table inet pcab{i} {{\n{HEAD}{body.replace('@IF@', f'pd-{i}')}}}\n"
                   for i in range(K))


def tables():
    return 1 if mode in ("vmap", "conntrack") else K


REAL = mode in ("sandboxes", "network")
NET = "pcab"


def start_sandboxes():
    """K idle sandboxes in the uplink; returns their processes once every CMD runs."""
    extra = ["--network", NET] if mode == "network" else ["--pool4", br.POOL4, "--pool6", br.POOL6]
    procs = []
    for _ in range(K):
        argv = br.nsexec(b.up, [br.PORTCULLIS, "run", "--allow", "x", "--upstream-dns", br.AUTH4]
                         + extra + ["--", "sleep", "600"])
        procs.append(subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL))
    deadline = time.monotonic() + 120
    while True:
        running = sum(1 for p in procs if any(br._comm(x) == "sleep" for x in br.descendants(p.pid)))
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError("a sandbox ended: " + dead[0].stderr.read().decode()[-500:])
        if running == K:
            return procs
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {running} of {K} sandboxes started")
        time.sleep(0.2)


def stop_sandboxes(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


b = br.Bench()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
try:
    b.claim()
    b.build_topology()
    dns = br.DnsFigure(b, br.parse_args())
    dns.n_qps = dns.n_lat = dns.first_rep = 0
    dns.setup()
    web = br.WebFigure(b, br.parse_args())
    web.setup()
    script = None if REAL else ruleset()
    if mode == "network":
        br.run(br.nsexec(b.up, [br.PORTCULLIS, "network", "create", NET, "--subnet4",
                                "203.0.113.128/25", "--subnet6", "2001:db8:fffe:1::/64"]))

    def nft(text):
        br.run(br.nsexec(b.up, ["nft", "-f", "-"]), input=text)

    def one(with_rules):
        br.run(br.nsexec(b.up, ["conntrack", "-F"]), check=False)
        procs = []
        if with_rules and REAL:
            procs = start_sandboxes()
        elif with_rules:
            nft(script)
        routed = mode == "conntrack"
        if not routed:
            b.masquerade(True)
        try:
            out = br.run(br.nsexec(b.c if routed else b.n, ["wrk", "-t", "1", "-c", "32", "-d", f"{secs}s", "-H",
                                         "Connection: close",
                                         f"http://web.{br.ZONE}:"
                                         f"{br.WEB_PORTS['unfiltered' if routed else 'masquerade']}/"]),
                         timeout=int(secs) + 60)
        finally:
            if not routed:
                b.masquerade(False)
            if procs:
                stop_sandboxes(procs)
            elif with_rules:
                nft("".join(f"delete table inet pcab{i}\n" for i in range(tables())))
        return float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))

    ratios = []
    for r in range(rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        got = {}
        for w in order:
            got[w] = one(w)
            time.sleep(1)
        ratios.append(got[True] / got[False])
        print(f"round {r}: none {got[False]:.0f}, {mode} K={K} {got[True]:.0f} conn/s", flush=True)
    print(f"{mode} K={K}: median ratio {statistics.median(ratios):.3f} over {rounds} rounds")
finally:
    if mode == "network":
        br.run(br.nsexec(b.up, [br.PORTCULLIS, "network", "delete", NET]), check=False)
    b.cleanup()
