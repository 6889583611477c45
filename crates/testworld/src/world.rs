//! [`World`]: two namespaces joined by a veth pair, the world's DNS server, its counters and
//! far-side servers, and the teardown that removes all of it.
//!
//! ```text
//!  [sandbox, made by portcullis] --veth-- [<p>-up] world0 ==veth== uplink0 [<p>-w]
//!                                          203.0.113.1/30         203.0.113.2/30
//!                                          2001:db8:ffff::1/64    2001:db8:ffff::2/64
//!                                          default -> world       local 198.51.100.0/24
//!                                                                 local 2001:db8::/48
//!                                                                 local 2001:db8:1::/64
//!                                                                 default -> uplink
//! ```

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, Once, PoisonError};
use std::time::Duration;

use crate::counters;
use crate::dns::{self, DnsQuery};
use crate::exec::{ip_in, netns_exec, run};
use crate::run::{self as runs, ETC_NETNS, Run, cleanup_stale};
use crate::servers::{self, SERVE_SCRIPT, ServerProcess};
use crate::zone::Zone;

/// MAC addresses of the veth pair (locally administered; each pair lives in its own
/// namespaces, so every world can use the same ones).
const UPLINK_MAC: &str = "02:00:cb:00:71:01";
const WORLD_MAC: &str = "02:00:cb:00:71:02";

/// Stale runs are cleaned once per test process, by its first world.
static CLEANUP_STALE: Once = Once::new();

/// A private internet for one test: an uplink namespace ("the host", where Portcullis runs),
/// a world namespace behind it with a `.test` DNS server, servers on every world address, and
/// counters of what arrived. Everything is removed when the `World` drops, whether the test
/// passed, failed or panicked; nothing is ever added to the root namespace.
///
/// ```no_run
/// use portcullis_testworld::{World, Zone, require_root};
///
/// require_root();
/// let world = World::new(&Zone::new().a("a.test", [198, 51, 100, 10], 60));
/// world.serve_http(80);
/// let out = world
///     .uplink_cmd("curl")
///     .args(["-sS", "--max-time", "5", "http://a.test/"])
///     .output()
///     .expect("run curl");
/// assert_eq!(out.stdout, World::HELLO.as_bytes());
/// assert!(world.packets_to_port([198, 51, 100, 10].into(), "tcp", 80) > 0);
/// ```
#[derive(Debug)]
pub struct World {
    run: Run,
    uplink: String,
    world: String,
    dns_pid: u32,
    servers: Mutex<Vec<ServerProcess>>,
}

impl World {
    /// The uplink's address on the link to the world.
    pub const UPLINK_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    /// The uplink's IPv6 address on the link to the world.
    pub const UPLINK_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
    /// The world's address on the link (the uplink's default gateway).
    pub const WORLD_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    /// The world's IPv6 address on the link (the uplink's default gateway).
    pub const WORLD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 2);
    /// The world's DNS server, the only nameserver in the namespaces' `resolv.conf`.
    pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
    /// The world's DNS server over IPv6.
    pub const DNS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53);
    /// Every address in it is the world's own (a local route): servers answer on all of them.
    pub const LOCAL4: &str = "198.51.100.0/24";
    /// Every address in it is the world's own (a local route).
    pub const LOCAL6: &str = "2001:db8::/48";
    /// The addresses of generated names ([`crate::Zone::generated_v6`]) lie outside
    /// [`World::LOCAL6`]; this local route makes them the world's too.
    pub const LOCAL6_GENERATED: &str = "2001:db8:1::/64";
    /// IPv4 pool for Portcullis's sandboxes in tests. The uplink has no route for it;
    /// Portcullis makes its own. The world routes it back to the uplink.
    pub const POOL4: &str = "203.0.113.128/25";
    /// IPv6 pool for Portcullis's sandboxes in tests (same rules as [`World::POOL4`]).
    pub const POOL6: &str = "2001:db8:fffe::/48";
    /// The uplink's interface to the world.
    pub const UPLINK_IF: &str = "world0";
    /// The world's interface to the uplink (where the counters count).
    pub const WORLD_IF: &str = "uplink0";
    /// What the TCP, UDP and HTTP servers answer.
    pub const HELLO: &str = "hello from world\n";
    /// Longest life of a world server, even if its test process hangs on.
    pub const SERVER_LIFETIME: Duration = servers::SERVER_LIFETIME;

    /// Builds the world for `zone` and returns once its DNS server listens. Panics with a
    /// clear message if anything fails (what was built by then is removed again).
    pub fn new(zone: &Zone) -> World {
        crate::require_root();
        CLEANUP_STALE.call_once(cleanup_stale);
        let run = Run::claim();
        let mut world = World {
            uplink: runs::uplink_ns(run.prefix()),
            world: runs::world_ns(run.prefix()),
            run,
            dns_pid: 0,
            servers: Mutex::new(Vec::new()),
        };
        // From here on a panic drops `world`, and `Drop` removes what was built.
        world.setup_namespaces();
        world.forget_dead_namespace_state();
        world.setup_link();
        counters::setup(&world.world, Self::WORLD_IF, &world.run.dir());
        let script = world.run.dir().join("worldserve.py");
        fs::write(&script, SERVE_SCRIPT)
            .unwrap_or_else(|e| panic!("write {}: {e}", script.display()));
        let listen = [IpAddr::V4(Self::DNS_V4), IpAddr::V6(Self::DNS_V6)];
        let dns = dns::start(&world.world, &world.run.dir(), zone, &listen);
        world.dns_pid = dns.pid();
        world.lock_servers().push(dns);
        world
    }

    fn setup_namespaces(&self) {
        for ns in [&self.uplink, &self.world] {
            run(Command::new("ip").args(["netns", "add", ns]));
            // DAD off before any link exists: every IPv6 address, link-local ones too, is
            // usable at once instead of after a second of duplicate detection.
            sysctl(ns, "net.ipv6.conf.all.accept_dad=0");
            sysctl(ns, "net.ipv6.conf.default.accept_dad=0");
            // The kernel repeats its unsolicited MLD reports up to a second after the link
            // comes up; 1 ms between repeats gets them all sent before the counters exist.
            sysctl(
                ns,
                "net.ipv6.conf.default.mldv2_unsolicited_report_interval=1",
            );
            ip(ns, "link set lo up");
            // Processes run with `ip netns exec` see this file as /etc/resolv.conf: the
            // machine's own resolver is never a test's upstream.
            let etc = Path::new(ETC_NETNS).join(ns);
            let resolv = etc.join("resolv.conf");
            fs::create_dir_all(&etc)
                .and_then(|()| fs::write(&resolv, format!("nameserver {}\n", Self::DNS_V4)))
                .unwrap_or_else(|e| panic!("write {}: {e}", resolv.display()));
        }
        sysctl(&self.uplink, "net.ipv4.ip_forward=1");
        sysctl(&self.uplink, "net.ipv6.conf.all.forwarding=1");
        // The UDP servers answer from the address a datagram was sent to, which only a local
        // route owns; IPv6 accepts such a source address only with non-local binds allowed.
        sysctl(&self.world, "net.ipv4.ip_nonlocal_bind=1");
        sysctl(&self.world, "net.ipv6.ip_nonlocal_bind=1");
    }

    /// Portcullis keys its run state on the network namespace's inode
    /// (`/run/portcullis/net-<ino>`). A brand-new uplink has none; a directory with its inode
    /// was left by a dead namespace (a daemon a test stopped or killed keeps its sandboxes'
    /// records), and would make this world's "nothing left behind" checks see another's.
    fn forget_dead_namespace_state(&self) {
        // Nothing to report: a brand-new uplink usually has none.
        runs::remove_portcullis_state(&self.uplink, &mut Vec::new());
    }

    fn setup_link(&self) {
        let (up, w) = (self.uplink.as_str(), self.world.as_str());
        let (up_if, w_if) = (Self::UPLINK_IF, Self::WORLD_IF);
        let (up4, up6) = (Self::UPLINK_V4, Self::UPLINK_V6);
        let (w4, w6) = (Self::WORLD_V4, Self::WORLD_V6);
        // Made inside the uplink with its peer put straight into the world: the pair never
        // appears in the root namespace.
        ip(
            up,
            &format!(
                "link add {up_if} address {UPLINK_MAC} type veth \
                 peer name {w_if} address {WORLD_MAC} netns {w}"
            ),
        );
        for (ns, dev, v4, v6) in [(up, up_if, up4, up6), (w, w_if, w4, w6)] {
            ip(ns, &format!("addr add {v4}/30 dev {dev}"));
            ip(ns, &format!("-6 addr add {v6}/64 dev {dev} nodad"));
            ip(ns, &format!("link set {dev} up"));
        }
        // Permanent neighbours: no packet waits for ARP or neighbour discovery (a first UDP
        // datagram would sit in a queue meanwhile), and the counters see no ARP/ND chatter.
        for (ns, dev, mac, v4, v6) in [
            (up, up_if, WORLD_MAC, w4, w6),
            (w, w_if, UPLINK_MAC, up4, up6),
        ] {
            ip(
                ns,
                &format!("neigh add {v4} lladdr {mac} dev {dev} nud permanent"),
            );
            ip(
                ns,
                &format!("neigh add {v6} lladdr {mac} dev {dev} nud permanent"),
            );
        }
        ip(w, &format!("route add local {} dev lo", Self::LOCAL4));
        ip(w, &format!("-6 route add local {} dev lo", Self::LOCAL6));
        ip(
            w,
            &format!("-6 route add local {} dev lo", Self::LOCAL6_GENERATED),
        );
        // The uplink's only way out is the world; the world sends everything that is not its
        // own, the sandbox pools included, back to the uplink.
        for (ns, v4, v6) in [(up, w4, w6), (w, up4, up6)] {
            ip(ns, &format!("route add default via {v4}"));
            ip(ns, &format!("-6 route add default via {v6}"));
        }
    }

    /// The run's unique prefix (`tw` and 6 hex digits), shared by all its names.
    pub fn prefix(&self) -> &str {
        self.run.prefix()
    }

    /// Name of the uplink namespace (`<prefix>-up`), where Portcullis runs.
    pub fn uplink_ns(&self) -> &str {
        &self.uplink
    }

    /// Name of the world namespace (`<prefix>-w`).
    pub fn world_ns(&self) -> &str {
        &self.world
    }

    /// The run directory (scripts, zone, server logs); removed on drop.
    pub fn run_dir(&self) -> PathBuf {
        self.run.dir()
    }

    /// Pid of the DNS server process.
    pub fn dns_server_pid(&self) -> u32 {
        self.dns_pid
    }

    /// `ip netns exec <prefix>-up <program>`: add arguments, then run it.
    pub fn uplink_cmd(&self, program: impl AsRef<OsStr>) -> Command {
        netns_exec(&self.uplink, program)
    }

    /// `ip netns exec <prefix>-w <program>`.
    pub fn world_cmd(&self, program: impl AsRef<OsStr>) -> Command {
        netns_exec(&self.world, program)
    }

    /// Starts a TCP server on `port` of every world address: each connection gets
    /// [`World::HELLO`]. Panics if the port is taken.
    pub fn serve_tcp(&self, port: u16) {
        self.serve("tcp", port);
    }

    /// Starts a UDP server on `port` of every world address: each datagram gets
    /// [`World::HELLO`] back, from the address it was sent to.
    pub fn serve_udp(&self, port: u16) {
        self.serve("udp", port);
    }

    /// Starts an HTTP server on `port` of every world address: every GET gets 200 with
    /// [`World::HELLO`] as the body.
    pub fn serve_http(&self, port: u16) {
        self.serve("http", port);
    }

    fn serve(&self, mode: &str, port: u16) {
        let dir = self.run.dir();
        let mut servers = self.lock_servers();
        let name = format!("{mode}-{port}-{}", servers.len());
        let args = [
            "--mode",
            mode,
            "--port",
            &port.to_string(),
            "--line",
            Self::HELLO,
        ];
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let script = dir.join("worldserve.py");
        servers.push(ServerProcess::start(
            &self.world,
            &dir,
            &name,
            &script,
            &args,
        ));
    }

    /// The queries the world's DNS server received so far, oldest first, as
    /// (name in lower case without the trailing dot, type mnemonic).
    pub fn dns_queries(&self) -> Vec<(String, String)> {
        self.dns_log()
            .into_iter()
            .map(|q| (q.name, q.qtype))
            .collect()
    }

    /// The queries received so far, with transport and source address.
    pub fn dns_log(&self) -> Vec<DnsQuery> {
        dns::read_log(&self.run.dir())
    }

    /// Packets that arrived from the uplink for destination `ip` (any protocol).
    pub fn packets_to(&self, ip: IpAddr) -> u64 {
        counters::packets_to(&self.world, ip)
    }

    /// TCP or UDP packets (`proto` is `"tcp"` or `"udp"`) that arrived for `ip` port `port`.
    pub fn packets_to_port(&self, ip: IpAddr, proto: &str, port: u16) -> u64 {
        counters::packets_to_port(&self.world, ip, proto, port)
    }

    /// TCP SYNs (connection attempts, retransmissions included) that arrived for `ip` port
    /// `port`.
    pub fn syns_to(&self, ip: IpAddr, port: u16) -> u64 {
        counters::syns_to(&self.world, ip, port)
    }

    /// Packets that arrived from the uplink with source `ip`: a sandbox address here means
    /// the sandbox reached the world.
    pub fn packets_from(&self, ip: IpAddr) -> u64 {
        counters::packets_from(&self.world, ip)
    }

    /// Every packet that arrived from the uplink, of any kind (an idle uplink sends none).
    pub fn total_packets(&self) -> u64 {
        counters::total(&self.world)
    }

    fn lock_servers(&self) -> MutexGuard<'_, Vec<ServerProcess>> {
        // A test that panicked while holding the lock left the list intact.
        self.servers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `ip -n <ns> <args>`; panics if it fails.
fn ip(ns: &str, args: &str) {
    run(&mut ip_in(ns, args));
}

/// Sets a sysctl inside namespace `ns` (they are per namespace).
fn sysctl(ns: &str, setting: &str) {
    run(netns_exec(ns, "sysctl").args(["-q", "-w", setting]));
}

impl Drop for World {
    /// Kills the servers, then removes processes left in the namespaces, the namespaces,
    /// their `/etc/netns` entries and the run directory. Never panics: problems are
    /// collected and printed.
    fn drop(&mut self) {
        let mut errors = Vec::new();
        let servers = std::mem::take(
            self.servers
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for server in servers {
            if let Err(e) = server.stop() {
                errors.push(e);
            }
        }
        runs::teardown(self.run.prefix(), &mut errors);
        if !errors.is_empty() {
            let _ = writeln!(
                std::io::stderr(),
                "portcullis-testworld: teardown of {} left problems:\n  {}",
                self.run.prefix(),
                errors.join("\n  ")
            );
        }
    }
}
