//! The command line, defined once: parsing, `--help`, the man page and shell completions
//! all come from these types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Run a process that reaches only the domains its policy allows",
    long_about = "Portcullis runs a command in its own network namespace whose only resolver is Portcullis's DNS relay. \
An allowed name is resolved upstream and its addresses are put in the sandbox's nftables sets, acknowledged by the kernel, \
before the answer is released; everything else is dropped in the kernel."
)]
pub struct Cli {
    /// More output: -v shows every DNS decision and blocked flow live, -vv debug details.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Format of Portcullis's own log lines on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Directory for run state [default: /run/portcullis/net-<netns inode>].
    #[arg(long, global = true, env = "PORTCULLIS_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run CMD in a sandbox that reaches only what the policy allows.
    Run(RunArgs),
    /// Run CMD with open egress, record every name it resolves and every flow it opens, and
    /// write the allow-list it needs.
    Learn(LearnArgs),
    /// Work offline with policies and learn logs: import, suggest, check.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Remove what killed runs left behind in this network namespace.
    Cleanup,
    /// Named networks shared by several sandboxes: create, list, show, delete.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Run the daemon for long-lived sandboxes, managed over a local socket and a TLS API.
    Serve(ServeArgs),
    /// Long-lived sandboxes of a daemon: create, list, show, exec, policy set, logs, delete.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// The daemon's trusted client certificates and join tokens.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Remote daemons this client talks to (`--remote NAME`).
    #[command(subcommand)]
    Remote(RemoteCommand),
    /// Follow a daemon's events (DNS decisions, blocked flows, lifecycle), one JSON object
    /// per line.
    Monitor {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// dnstap: open addresses in sandboxes' sets from the answers an external resolver logs.
    #[command(subcommand)]
    Dnstap(DnstapCommand),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Create a network: a bridge with a gateway address in each subnet.
    Create {
        /// The network's name: 1 to 32 of a-z, 0-9, '-' and '_'.
        name: String,
        /// IPv4 subnet [default: a free /24 of --pool4].
        #[arg(long, value_name = "CIDR")]
        subnet4: Option<ipnet::Ipv4Net>,
        /// IPv6 subnet [default: a free /64 of --pool6].
        #[arg(long, value_name = "CIDR")]
        subnet6: Option<ipnet::Ipv6Net>,
        /// IPv4 pool the default subnet is taken from.
        #[arg(long, value_name = "CIDR", default_value = portcullis_kernel::addrpool::DEFAULT_POOL4, env = "PORTCULLIS_POOL4")]
        pool4: ipnet::Ipv4Net,
        /// IPv6 pool the default subnet is taken from.
        #[arg(long, value_name = "CIDR", default_value = portcullis_kernel::addrpool::DEFAULT_POOL6, env = "PORTCULLIS_POOL6")]
        pool6: ipnet::Ipv6Net,
    },
    /// List the networks of this network namespace.
    List,
    /// Show one network and the sandboxes attached to it (JSON).
    Show { name: String },
    /// Delete a network; refused while sandboxes are attached.
    Delete { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DenyResponse {
    Nxdomain,
    Refused,
}

/// The sandbox options `run` and `learn` share.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Publish a port of the host to the sandbox: connections to HOST_PORT (on HOST_ADDR, else
    /// on every host address and 127.0.0.1) reach SANDBOX_PORT. Default protocol tcp.
    #[arg(long, value_name = "[HOST_ADDR:]HOST_PORT:SANDBOX_PORT[/tcp|/udp]")]
    pub publish: Vec<String>,
    /// Upstream resolver [default: the nameservers of /etc/resolv.conf].
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub upstream_dns: Vec<String>,
    /// Run CMD as USER[:GROUP] [default: the sudo caller, else root without capabilities].
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// IPv4 pool for sandbox addresses (a /30 each).
    #[arg(long, value_name = "CIDR", default_value = portcullis_kernel::addrpool::DEFAULT_POOL4, env = "PORTCULLIS_POOL4")]
    pub pool4: ipnet::Ipv4Net,
    /// IPv6 pool for sandbox addresses (a /64 each).
    #[arg(long, value_name = "CIDR", default_value = portcullis_kernel::addrpool::DEFAULT_POOL6, env = "PORTCULLIS_POOL6")]
    pub pool6: ipnet::Ipv6Net,
    /// Attach the sandbox to the named network (see `portcullis network create`): it shares
    /// that network's segment with other sandboxes, which it reaches only where its policy
    /// allows their addresses.
    #[arg(long, value_name = "NAME")]
    pub network: Option<String>,
    /// Send the relay's DNS messages (client and forwarder queries and responses) as dnstap
    /// over Frame Streams: to a collector's UNIX socket or TCP port, or into a file. A slow or
    /// gone collector never slows the relay: messages beyond a bounded queue are dropped and
    /// counted.
    #[arg(long, value_name = "unix:PATH|tcp:ADDR:PORT|file:PATH")]
    pub dnstap: Option<portcullis_dnstap::Destination>,
}

#[derive(Debug, Subcommand)]
pub enum DnstapCommand {
    /// Accept dnstap from a resolver (unbound, BIND, Knot...) and, for its answers to clients of
    /// the given sandboxes or subnets, open the addresses of the names the policy allows in
    /// those sets. Asynchronous: a client may connect before its addresses are open (see
    /// docs/dnstap.md).
    Listen(DnstapListenArgs),
}

#[derive(Debug, Args)]
pub struct DnstapListenArgs {
    /// Listen on this UNIX socket (a stale socket file is replaced).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "tcp",
        conflicts_with = "tcp"
    )]
    pub socket: Option<PathBuf>,
    /// Permissions of the --socket file, in octal. Whoever may write to it can make the
    /// consumer open addresses (for names the policy allows): give access to the resolver only.
    #[arg(long, value_name = "MODE", default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Group of the --socket file (a resolver that runs as its own user, such as unbound,
    /// connects through it with --socket-mode 660).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Listen on this TCP address. dnstap has no authentication: bind to loopback or to an
    /// address only the resolver reaches.
    #[arg(long, value_name = "ADDR:PORT")]
    pub tcp: Option<std::net::SocketAddr>,
    /// A running sandbox (its id, or its table portcullis_<id>): answers to its address open
    /// its sets. Repeatable.
    #[arg(long, value_name = "ID|TABLE")]
    pub sandbox: Vec<String>,
    /// Answers to clients in CIDR open the sets of the nftables table `inet TABLE`, which must
    /// hold the sets allow4, allow6, allow4p and allow6p (as a sandbox's table does).
    /// Repeatable.
    #[arg(long, value_name = "CIDR=TABLE")]
    pub subnet: Vec<String>,
    /// Allow a domain pattern or an address/CIDR, as for `run`.
    #[arg(long, value_name = "PATTERN|CIDR")]
    pub allow: Vec<String>,
    /// Allow every pattern or CIDR listed in FILE.
    #[arg(long, value_name = "FILE")]
    pub allow_file: Vec<PathBuf>,
    /// TOML policy file.
    #[arg(long, value_name = "FILE")]
    pub policy: Vec<PathBuf>,
    /// Set elements live at least this many seconds, whatever the TTL.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub min_ttl: u32,
    /// Elements live at most this many seconds.
    #[arg(long, default_value_t = 86_400, value_name = "SECONDS")]
    pub max_ttl: u32,
    /// Largest Frame Streams data frame accepted; a larger one ends its connection.
    #[arg(long, default_value_t = portcullis_dnstap::fstrm::DEFAULT_MAX_FRAME, value_name = "BYTES")]
    pub max_frame: usize,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Allow a domain pattern (example.com, *.example.com, **.example.com) or an address/CIDR.
    #[arg(long, value_name = "PATTERN|CIDR")]
    pub allow: Vec<String>,
    /// Allow every pattern or CIDR listed in FILE (one per line, '#' comments).
    #[arg(long, value_name = "FILE")]
    pub allow_file: Vec<PathBuf>,
    /// TOML policy file (allow and deny rules, ports, protocols, CIDRs).
    #[arg(long, value_name = "FILE")]
    pub policy: Vec<PathBuf>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Answer for denied names.
    #[arg(long, value_enum, default_value_t = DenyResponse::Nxdomain)]
    pub deny_response: DenyResponse,
    /// Set elements live at least this many seconds, whatever the TTL.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub min_ttl: u32,
    /// Larger TTLs are lowered to this in answers, and elements live at most this long.
    #[arg(long, default_value_t = 86_400, value_name = "SECONDS")]
    pub max_ttl: u32,
    /// Write the end-of-run report (denied names, blocked flows, suggested rules) as JSON.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Host mode: keep CMD in this network namespace and filter the egress of CMD and its
    /// descendants by their cgroup v2 group (where cgroup v2 is not usable: by the socket owner,
    /// a dedicated --user).
    #[arg(long)]
    pub host_network: bool,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// Output formats of a written policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyFormat {
    /// Portcullis TOML policy, with provenance comments.
    Toml,
    /// One pattern or CIDR per line, for --allow-file.
    List,
    /// The rules and their provenance as JSON.
    Json,
    /// dnsmasq server= and nftset= lines.
    Dnsmasq,
    /// Squid dstdomain and dst ACLs.
    Squid,
    /// Cilium CiliumNetworkPolicy with toFQDNs (YAML).
    Cilium,
    /// StepSecurity harden-runner allowed-endpoints (YAML step).
    HardenRunner,
    /// /etc/hosts-style pins of the addresses seen.
    Hosts,
}

/// How the learned policy is written (shared by `learn` and `policy suggest`).
#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Write the policy to FILE [default: standard output].
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Format of the written policy.
    #[arg(long, value_enum, default_value_t = PolicyFormat::Toml)]
    pub format: PolicyFormat,
    /// Suggest *. and **. patterns where N or more sibling names share a parent (never at or
    /// above a public suffix).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..))]
    pub collapse: Option<u32>,
}

#[derive(Debug, Args)]
pub struct LearnArgs {
    #[command(flatten)]
    pub write: WriteArgs,
    /// Write the learn log (JSON lines: every query and every flow) to FILE.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Convert a dnsmasq log-queries log into a learn log.
    Import {
        /// The dnsmasq log (log-queries, optionally log-queries=extra).
        #[arg(long, value_name = "FILE", required = true)]
        dnsmasq_log: PathBuf,
        /// Year of the log's timestamps (syslog lines carry none) [default: this year].
        #[arg(long)]
        year: Option<i32>,
        /// Write the learn log to FILE [default: standard output].
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Merge one or more learn logs into one policy.
    Suggest {
        #[command(flatten)]
        write: WriteArgs,
        /// Learn logs (from learn --log or policy import).
        #[arg(required = true, value_name = "LOG")]
        logs: Vec<PathBuf>,
    },
    /// Replay learn logs against a policy: what would be blocked, which rules were never
    /// used. Exits 1 when anything would be blocked.
    Check {
        /// TOML policy file.
        #[arg(value_name = "POLICY")]
        policy: PathBuf,
        /// Learn logs to replay.
        #[arg(required = true, value_name = "LOG")]
        logs: Vec<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML) [default: /etc/portcullis/serve.toml, when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve the remote API (TLS 1.3, client certificates) on ADDR:PORT; overrides the file.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<std::net::SocketAddr>,
    /// Path of the local API socket; overrides the file.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Directory of the database and the server's certificate; overrides the file.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Which daemon a client command talks to.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The daemon's local socket.
    #[arg(
        long,
        value_name = "PATH",
        env = "PORTCULLIS_SOCKET",
        default_value = "/run/portcullis/portcullis.sock"
    )]
    pub socket: PathBuf,
    /// A remote daemon added with `portcullis remote add`.
    #[arg(long, value_name = "NAME")]
    pub remote: Option<String>,
}

/// A policy given on the command line of a client command.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// Allow a domain pattern (`example.com`, `*.example.com`, `**.example.com`), with
    /// optional ports (`example.com:443`); repeatable.
    #[arg(long, value_name = "PATTERN")]
    pub allow: Vec<String>,
    /// A TOML policy file.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a long-lived sandbox: enforcing its policy, or (--learn) learning what it
    /// needs.
    Create {
        name: String,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Learn instead of enforcing, as `portcullis learn` does: egress is open, and every
        /// query and new flow is recorded (download it with `sandbox learned`).
        #[arg(long, conflicts_with_all = ["allow", "policy"])]
        learn: bool,
        /// Attach to a named network of the daemon.
        #[arg(long, value_name = "NAME")]
        network: Option<String>,
        /// Publish a port: [HOST_ADDR:]HOST_PORT:SANDBOX_PORT[/tcp|/udp]; repeatable.
        #[arg(long, value_name = "SPEC")]
        publish: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Put an existing network namespace (a container's) under a policy. Only a table is
    /// added inside it (its links, routes and resolv.conf stay as they are); `detach`
    /// removes it again. Give exactly one of --netns and --pid.
    Attach {
        name: String,
        /// The namespace's file, e.g. /run/netns/NAME or /run/docker/netns/ID.
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "pid",
            conflicts_with = "pid"
        )]
        netns: Option<PathBuf>,
        /// A process in the namespace, as the daemon's host sees it (a container's init:
        /// `docker inspect -f '{{.State.Pid}}' ID`).
        #[arg(long, value_name = "PID")]
        pid: Option<u32>,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Take the policy off an attached namespace: it is back as it was before `attach`.
    Detach {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the sandboxes.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one sandbox (JSON).
    Show {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a sandbox: every process in it ends, and its addresses and rules go.
    Delete {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run a command in a sandbox; exits with its status.
    Exec {
        name: String,
        /// Give the command a terminal.
        #[arg(short = 't', long)]
        tty: bool,
        /// Run it as USER or UID[:GID].
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// A sandbox's policy.
    #[command(subcommand)]
    Policy(SandboxPolicyCommand),
    /// What a sandbox was denied and blocked, with the rules that would allow it (JSON).
    Logs {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// What a learning sandbox (`create --learn`) learned so far: its learn log (JSON
    /// lines), for `portcullis policy suggest` or `policy check`.
    Learned {
        name: String,
        /// Write the log to FILE [default: standard output].
        #[arg(short = 'o', long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum SandboxPolicyCommand {
    /// Replace the policy at once: what only the old one allowed is revoked, and live
    /// connections to it are cut.
    Set {
        name: String,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the policy.
    Show {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Trust a client certificate (PEM file) with a role.
    Add {
        certificate: PathBuf,
        #[arg(long)]
        name: String,
        /// auditor, user, operator or admin.
        #[arg(long)]
        role: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List trusted certificates and revoked fingerprints.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove (and revoke) a certificate, by name or fingerprint.
    Remove {
        which: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Issue a one-time join token for a new client.
    Token {
        name: String,
        /// auditor, user, operator or admin.
        #[arg(long)]
        role: String,
        /// Seconds the token stays valid.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Add a remote daemon: shows its certificate's fingerprint for confirmation (or takes
    /// it from a join token), and joins with the token when one is given.
    Add {
        name: String,
        /// https://HOST:PORT
        url: String,
        /// A join token from `portcullis trust token` on the daemon.
        #[arg(long)]
        token: Option<String>,
        /// Accept this server fingerprint without asking.
        #[arg(long, value_name = "SHA256")]
        accept_fingerprint: Option<String>,
    },
    /// List remotes.
    List,
    /// Forget a remote.
    Remove { name: String },
}

/// An octal file mode such as 600 or 0660 (permission bits only).
fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode such as 600 or 660"))
}
