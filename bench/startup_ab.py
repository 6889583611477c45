#!/usr/bin/python3
"""Start-up A/B of Portcullis binaries, interleaved: `bench/startup_ab.py OLD NEW [N]`.

Each of N iterations (default 100, after 3 unmeasured ones) runs
`BINARY run --allow x.test -- true` for every binary given, and `unshare -n true`, in an
order that rotates from one iteration to the next, so that the machine's drift (other work,
the kernel's deferred clean-up of earlier runs) falls on all of them alike. Prints each
command's median wall time, its ratio to `unshare -n true`, and its deciles.

Runs as root, in a network namespace of its own (`pcab` and 6 random hex digits) with only
loopback, deleted at the end: nothing is sent anywhere (the sandboxes' relay is never asked).
Standard library only.
"""

import os
import secrets
import statistics
import subprocess
import sys
import time

ARGS = [
    "run",
    "--upstream-dns", "198.51.100.53",
    "--pool4", "203.0.113.128/25",
    "--pool6", "2001:db8:fffe::/48",
    "--allow", "x.test",
    "--", "true",
]


def main() -> int:
    if os.geteuid() != 0:
        print("startup_ab.py: needs root", file=sys.stderr)
        return 77
    args = sys.argv[1:]
    n = 100
    if args and args[-1].isdigit():
        n = int(args.pop())
    if not args:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    ns = "pcab" + secrets.token_hex(3)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        inside = ["ip", "netns", "exec", ns]
        subprocess.run(inside + ["ip", "link", "set", "lo", "up"], check=True)
        subprocess.run(
            inside + ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            check=True,
        )
        # The loop runs inside the namespace (one `ip netns exec` for all of it), so that
        # what is timed is the command alone.
        code = f"""
import statistics, subprocess, time
cmds = {[(b, [os.path.abspath(b)] + ARGS) for b in args] + [("unshare -n true", ["unshare", "-n", "true"])]!r}
times = {{name: [] for name, _ in cmds}}
for i in range({n} + 3):
    k = i % len(cmds)
    for name, argv in cmds[k:] + cmds[:k]:
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        if i >= 3:
            times[name].append((time.perf_counter() - t) * 1000)
base = statistics.median(times["unshare -n true"])
for name, _ in cmds:
    m = statistics.median(times[name])
    deciles = "/".join("%.1f" % q for q in statistics.quantiles(times[name], n=10))
    print("%-40s median %6.2f ms  %5.2fx unshare  deciles %s" % (name, m, m / base, deciles))
"""
        return subprocess.run(inside + [sys.executable, "-c", code]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    sys.exit(main())
