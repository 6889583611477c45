//! One sandbox as the relay sees it: its policy, its sets, the expiry map that keeps every
//! set element's timeout monotonic, and what it asked for (the end-of-run report).
//!
//! The relay is built for many sandboxes: a `SandboxCtx` per sandbox, one `RelayConfig` and
//! one `SetWriter` shared by all.
//!
//! The policy can be swapped while the sandbox runs (`set_policy`): every query decides with
//! one snapshot of it, and the elements that only the old policy allowed are revoked. For
//! that, the expiry map also remembers which names opened each element.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use portcullis_kernel::nft::sets::{Element, ElementKey, SetWriter, SetsAt};
use portcullis_policy::{Access, Decision, DomainName, Policy};
use serde::{Deserialize, Serialize};

use crate::answer::{self, Rejection};
use crate::cache::AnswerCache;
use crate::tap::{DnsTap, TapEvent, TapKind};
use crate::upstream;

/// Added to every element's timeout: a client may connect at the very end of the TTL.
pub const GRACE: Duration = Duration::from_secs(1);

/// Relay settings shared by every sandbox.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub upstreams: Vec<std::net::SocketAddr>,
    /// NXDOMAIN (default) or REFUSED for denied names.
    pub deny_rcode: ResponseCode,
    /// Set elements live at least this long, whatever the TTL (default 60 s).
    pub min_ttl: u32,
    /// TTLs above this are lowered in the answer, and elements live at most this long.
    pub max_ttl: u32,
    /// Per upstream attempt.
    pub upstream_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            upstreams: Vec::new(),
            deny_rcode: ResponseCode::NXDomain,
            min_ttl: 60,
            max_ttl: 86_400,
            upstream_timeout: Duration::from_secs(2),
        }
    }
}

/// What a sandbox asked for, for the end-of-run summary and `--report`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DnsReport {
    /// Denied names with how often they were asked.
    pub denied: BTreeMap<String, u64>,
    /// Allowed names with how often they were answered.
    pub allowed: BTreeMap<String, u64>,
    /// Allowed names whose answer failed (upstream down, set insertion failed): SERVFAIL.
    pub failed: BTreeMap<String, u64>,
    /// Queries that were not valid DNS (answered FORMERR/NOTIMP or dropped).
    pub malformed: u64,
    /// Which names' answers held each address.
    #[serde(skip)]
    pub names_of: HashMap<IpAddr, BTreeSet<String>>,
    /// Answers' addresses that no name may open (loopback, link-local, metadata...), as
    /// "name -> address", with how often they were removed from answers.
    pub refused_addresses: BTreeMap<String, u64>,
    /// Events not itemised because a map above was full (see `MAX_REPORT_ENTRIES`).
    pub unlisted: u64,
}

/// Distinct names (and addresses) a report itemises per map: a job asking for endless unique
/// names (random subdomains, a benchmark) must not grow the relay's memory without bound.
pub const MAX_REPORT_ENTRIES: usize = 10_000;

impl DnsReport {
    /// Counts one event for `name` in `map`, or in `unlisted` once the map is full.
    fn count(map: &mut BTreeMap<String, u64>, unlisted: &mut u64, name: String) {
        if map.len() < MAX_REPORT_ENTRIES || map.contains_key(&name) {
            *map.entry(name).or_default() += 1;
        } else {
            *unlisted += 1;
        }
    }
}

/// A query as the relay answered it, for `learn`'s log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The queried name, lowercase, without the trailing dot.
    pub name: String,
    pub qtype: String,
    /// "NOERROR", "NXDOMAIN", "SERVFAIL"...; "TIMEOUT" when no upstream answered.
    pub rcode: String,
    /// Addresses bound to the name through its CNAME chain, as released to the sandbox.
    pub answers: Vec<IpAddr>,
    /// The CNAME chain after the queried name.
    pub cnames: Vec<String>,
    /// Smallest TTL of the bound addresses.
    pub ttl: Option<u32>,
}

/// Receives every query a learning sandbox makes, before its answer is released.
pub trait QueryObserver: Send + Sync + std::fmt::Debug {
    fn observed(&self, q: Observed);
}

/// Names remembered per element: enough to explain and re-check a shared (CDN) address, and
/// bounded, so that a job asking endless names of one address cannot grow the map.
pub const MAX_NAMES_PER_ELEMENT: usize = 8;

/// The policy with its generation, read together by every query.
#[derive(Debug)]
struct Versioned {
    policy: Arc<Policy>,
    generation: u64,
}

/// One live element: when it expires, and which names' answers opened it.
#[derive(Debug, Clone)]
struct Live {
    until: Instant,
    names: Vec<Arc<DomainName>>,
    /// More names opened it than `names` holds: a revocation cannot tell whether a name it
    /// does not know still grants it, so it keeps the element only if a known name does.
    unknown_names: bool,
}

impl Live {
    fn note_name(&mut self, name: &Arc<DomainName>) {
        if self.names.iter().any(|n| **n == **name) {
            return;
        }
        if self.names.len() < MAX_NAMES_PER_ELEMENT {
            self.names.push(name.clone());
        } else {
            self.unknown_names = true;
        }
    }
}

/// What a policy swap took away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revoked {
    /// Elements removed from the kernel sets: no name that opened them is still granted them.
    pub keys: Vec<ElementKey>,
    /// Elements added in their place, for the same remaining time: an address that a name may
    /// now reach on given ports only loses its every-port element and gets one per port, so
    /// that the swap does not cut what the new policy still allows. Flows matching these keys
    /// must be spared when the revoked ones are cut (`conntrack::delete_flows`).
    pub narrowed: Vec<ElementKey>,
}

/// One live element, as the daemon keeps it across a restart (JSON in its store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedElement {
    pub key: ElementKey,
    /// Time left before it expires, in milliseconds.
    pub remaining_ms: u64,
    /// The names whose answers opened it (at most `MAX_NAMES_PER_ELEMENT`).
    pub names: Vec<DomainName>,
    /// More names opened it than `names` lists.
    #[serde(default)]
    pub unknown_names: bool,
}

/// Receives every decision of a sandbox's relay: `decision` is "allowed", "denied" or
/// "failed"; `addresses` are those released (allowed only). Called before the answer goes.
pub trait DecisionSink: Send + Sync + std::fmt::Debug {
    fn decided(&self, name: &str, qtype: &str, decision: &str, addresses: &[IpAddr]);

    /// How long the upstream took to answer a forwarded query (not called for cache hits,
    /// nor for failures).
    fn upstream_answered(&self, _elapsed: Duration) {}
}

/// One sandbox, as the relay serves it.
#[derive(Debug)]
pub struct SandboxCtx {
    /// Where the sandbox's sets are.
    pub sets: SetsAt,
    /// Source addresses the sandbox may query from.
    pub peers: Vec<IpAddr>,
    policy: RwLock<Versioned>,
    writer: Arc<dyn SetWriter>,
    expiry: Mutex<HashMap<ElementKey, Live>>,
    inserts: AtomicU64,
    report: Mutex<DnsReport>,
    cache: Arc<AnswerCache>,
    /// Set when learning: every name is forwarded, nothing goes into sets (egress is open),
    /// and every query is reported here.
    observer: Option<Arc<dyn QueryObserver>>,
    /// Told of every decision (a daemon's event stream).
    decisions: Option<Arc<dyn DecisionSink>>,
    /// How logs and the tap name this sandbox (by default, its table: `portcullis_<id>`).
    label: String,
    /// Sees every message the relay receives and sends for this sandbox (dnstap).
    tap: Option<Arc<dyn DnsTap>>,
}

/// What [`SandboxCtx::open_answer`] made of an answer the relay did not give itself (one a
/// resolver reported over dnstap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerOutcome {
    /// The name is allowed: its addresses are in the sets (or already were, for longer).
    Allowed { name: String, addrs: Vec<IpAddr> },
    /// The policy denies the name (or a name on its CNAME chain): nothing opened.
    Denied { name: String },
    /// Nothing to act on: not a DNS response, no single question, or an error code.
    Ignored(&'static str),
    /// The sets refused the elements.
    Failed { name: String, error: String },
}

/// Addresses as the logs show them: comma-separated, in answer order.
fn addr_list<'a>(addrs: impl IntoIterator<Item = &'a IpAddr>) -> String {
    addrs
        .into_iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The response code of a reply in wire form, by its name in zone files and logs.
pub fn rcode_name(wire: &[u8]) -> String {
    let code = wire.get(3).map_or(2, |b| b & 0x0f);
    match code {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

fn shown(name: &hickory_proto::rr::Name) -> String {
    let s = name.to_ascii().to_ascii_lowercase();
    s.strip_suffix('.').map(str::to_owned).unwrap_or(s)
}

impl SandboxCtx {
    pub fn new(
        sets: SetsAt,
        peers: Vec<IpAddr>,
        policy: Arc<Policy>,
        writer: Arc<dyn SetWriter>,
    ) -> Self {
        let label = match &sets.owner {
            Some(id) => id.table(),
            None => sets.table.clone(),
        };
        SandboxCtx {
            peers,
            policy: RwLock::new(Versioned {
                policy,
                generation: 0,
            }),
            writer,
            expiry: Mutex::new(HashMap::new()),
            inserts: AtomicU64::new(0),
            report: Mutex::new(DnsReport::default()),
            cache: Arc::default(),
            observer: None,
            decisions: None,
            label,
            tap: None,
            sets,
        }
    }

    /// Runs an upstream exchange, telling the decision sink (if any) how long an answer took.
    async fn timed<T, E>(
        &self,
        f: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let Some(d) = &self.decisions else {
            return f.await;
        };
        let started = Instant::now();
        let r = f.await;
        if r.is_ok() {
            d.upstream_answered(started.elapsed());
        }
        r
    }

    /// Reports every decision to `sink` (see `DecisionSink`).
    pub fn with_decisions(mut self, sink: Arc<dyn DecisionSink>) -> Self {
        self.decisions = Some(sink);
        self
    }

    fn decided(&self, name: &str, q: &answer::Query, decision: &str, addrs: &[IpAddr]) {
        if let Some(d) = &self.decisions {
            d.decided(name, &q.qtype.to_string(), decision, addrs);
        }
    }

    /// Names the sandbox in logs and dnstap messages (by default: its table name).
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// How logs and the tap name this sandbox.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Tells `tap` of every message received and sent for this sandbox.
    pub fn with_tap(mut self, tap: Arc<dyn DnsTap>) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Turns the sandbox into a learning one: see `observer`.
    pub fn learning(mut self, observer: Arc<dyn QueryObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Whether this sandbox learns (see `learning`).
    pub fn is_learning(&self) -> bool {
        self.observer.is_some()
    }

    fn observe(&self, name: &str, q: &answer::Query, rcode: String, bound: &answer::Bound) {
        if let Some(o) = &self.observer {
            o.observed(Observed {
                name: name.to_owned(),
                qtype: q.qtype.to_string(),
                rcode,
                answers: bound.addrs.iter().map(|(ip, _)| *ip).collect(),
                cnames: bound.chain.iter().map(shown).collect(),
                ttl: bound.addrs.iter().map(|(_, t)| *t).min(),
            });
        }
    }

    /// Shares one answer cache between sandboxes (a daemon's relay).
    pub fn with_cache(mut self, cache: Arc<AnswerCache>) -> Self {
        self.cache = cache;
        self
    }

    /// The policy queries are decided with now.
    pub fn policy(&self) -> Arc<Policy> {
        self.versioned().0
    }

    /// The policy and its generation, read together.
    fn versioned(&self) -> (Arc<Policy>, u64) {
        // A poisoned lock still holds a whole `Versioned`: the writer only assigns it.
        let v = self.policy.read().unwrap_or_else(|e| e.into_inner());
        (v.policy.clone(), v.generation)
    }

    /// Whether a CIDR rule of the policy allows `ip` explicitly.
    fn cidr_allows(policy: &Policy, ip: &IpAddr) -> bool {
        policy
            .cidr_rules()
            .any(|r| matches!(&r.target, portcullis_policy::Target::Cidr(net) if net.contains(ip)))
    }

    /// A copy of the report so far.
    pub fn report(&self) -> DnsReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn note(&self, f: impl FnOnce(&mut DnsReport)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }

    /// Answers one query from the sandbox's client `peer`, telling the tap (if any) of the
    /// query and of the reply; None means "send nothing".
    pub async fn handle_from(
        &self,
        cfg: &RelayConfig,
        bytes: &[u8],
        tcp: bool,
        peer: std::net::SocketAddr,
    ) -> Option<Vec<u8>> {
        let Some(tap) = &self.tap else {
            return self.handle(cfg, bytes, tcp).await;
        };
        let query_time = std::time::SystemTime::now();
        let mut event = TapEvent {
            kind: TapKind::ClientQuery,
            sandbox: &self.label,
            tcp,
            peer,
            query: bytes,
            query_time,
            response: None,
            response_time: None,
        };
        tap.tap(&event);
        let reply = self.handle(cfg, bytes, tcp).await;
        if let Some(r) = &reply {
            event.kind = TapKind::ClientResponse;
            event.response = Some(r);
            event.response_time = Some(std::time::SystemTime::now());
            tap.tap(&event);
        }
        reply
    }

    /// Answers one query from the sandbox; None means "send nothing".
    pub async fn handle(&self, cfg: &RelayConfig, bytes: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let q = match answer::parse_query(bytes) {
            Ok(q) => q,
            Err(r) => {
                self.note(|r| r.malformed += 1);
                tracing::debug!(target: "portcullis::dns", sandbox = %self.label, "malformed query");
                return match r {
                    Rejection::Drop => None,
                    Rejection::Reply(b) => Some(b),
                };
            }
        };
        let id = q.message.metadata.id;
        let name = shown(&q.name);
        // One snapshot of the policy for the whole query; a swap meanwhile is caught by its
        // generation when the elements are written (`open`).
        let (policy, generation) = self.versioned();
        let (access, domain) = if self.observer.is_some() {
            let any = Access {
                any_port: true,
                ports: Default::default(),
            };
            (any, None)
        } else {
            match DomainName::from_wire_labels(q.name.iter()) {
                Ok(n) => match policy.decide(&n) {
                    Decision::Allow(a) => (a, Some(n)),
                    Decision::Deny { .. } => return Some(self.deny(cfg, &q, id, name)),
                },
                Err(_) => return Some(self.deny(cfg, &q, id, name)),
            }
        };
        // A cached answer saves the upstream round trip (and any parsing: it is patched in
        // place); its addresses still go through `open` below before it is released.
        let (msg, wire, bound) = match self.cache.lookup(&q.message, bytes, tcp) {
            Some(hit) => (None, hit.wire, hit.bound),
            None => match self
                .timed(upstream::forward_tapped(
                    cfg,
                    &q,
                    bytes,
                    tcp,
                    self.tap.as_deref().map(|t| (t, self.label.as_str())),
                ))
                .await
            {
                Ok((msg, raw)) => {
                    if msg.metadata.response_code == ResponseCode::ServFail {
                        // The upstream's own failure: passed on as it is, and listed.
                        tracing::warn!(target: "portcullis::dns", sandbox = %self.label, name = %name, qtype = %q.qtype, decision = "failed", error = "upstream answered SERVFAIL", "upstream answered SERVFAIL");
                        self.note(|r| {
                            DnsReport::count(&mut r.failed, &mut r.unlisted, name.clone())
                        });
                    }
                    // No client caches an answer longer than its elements live.
                    let (msg, wire) = match answer::cap_ttls(&msg, cfg.max_ttl) {
                        Some(capped) => {
                            let wire = capped.to_vec().ok()?;
                            (capped, wire)
                        }
                        None => (msg, raw),
                    };
                    let bound = answer::bound_addresses(&msg, &q.name);
                    self.cache.store(&q.message, &msg, &wire, &bound);
                    (Some(msg), wire, bound)
                }
                Err(e) => {
                    tracing::warn!(target: "portcullis::dns", sandbox = %self.label, name = %name, qtype = %q.qtype, decision = "failed", error = %e, "upstream failed: SERVFAIL");
                    self.observe(&name, &q, "TIMEOUT".into(), &answer::Bound::default());
                    self.decided(&name, &q, "failed", &[]);
                    self.note(|r| DnsReport::count(&mut r.failed, &mut r.unlisted, name));
                    return Some(answer::error_reply(id, Some(&q), ResponseCode::ServFail));
                }
            },
        };
        // A chain through an explicitly denied name opens nothing: deny wins everywhere.
        for link in &bound.chain {
            if DomainName::from_wire_labels(link.iter())
                .is_ok_and(|n| policy.is_denied_explicitly(&n))
            {
                tracing::info!(target: "portcullis::dns", sandbox = %self.label, name = %name, qtype = %q.qtype, decision = "denied", via = %shown(link), "denied: CNAME into a denied name");
                return Some(self.deny(cfg, &q, id, name));
            }
        }
        // DNS rebinding onto loopback, link-local (cloud metadata) and the like opens
        // nothing, and those records never reach CMD; a CIDR rule may allow them explicitly.
        let (refused, addrs): (Vec<_>, Vec<_>) = bound
            .addrs
            .iter()
            .partition(|(ip, _)| answer::never_by_name(ip) && !Self::cidr_allows(&policy, ip));
        let wire = if refused.is_empty() {
            wire
        } else {
            let refused: Vec<IpAddr> = refused.iter().map(|(ip, _)| *ip).collect();
            tracing::warn!(target: "portcullis::dns", sandbox = %self.label, name = %name, addresses = %addr_list(&refused), "answer points at addresses never opened by name: removed");
            self.note(|r| {
                for ip in &refused {
                    DnsReport::count(
                        &mut r.refused_addresses,
                        &mut r.unlisted,
                        format!("{name} -> {ip}"),
                    );
                }
            });
            let msg = match msg {
                Some(m) => m,
                None => Message::from_vec(&wire).ok()?,
            };
            answer::strip_addresses(&msg, &refused).to_vec().ok()?
        };
        let bound = answer::Bound {
            addrs,
            chain: bound.chain,
        };
        if self.observer.is_some() {
            // Learning: egress is open, nothing to put in sets.
            self.observe(&name, &q, rcode_name(&wire), &bound);
            return Some(wire);
        }
        let Some(domain) = domain else {
            return Some(wire);
        };
        let opener = Opener {
            name: &domain,
            access: &access,
            generation,
        };
        if let Err(e) = self.open(cfg, &opener, &bound.addrs) {
            tracing::error!(target: "portcullis::dns", sandbox = %self.label, name = %name, qtype = %q.qtype, decision = "failed", error = %e, "set insertion failed: SERVFAIL");
            self.decided(&name, &q, "failed", &[]);
            self.note(|r| DnsReport::count(&mut r.failed, &mut r.unlisted, name));
            return Some(answer::error_reply(id, Some(&q), ResponseCode::ServFail));
        }
        tracing::info!(target: "portcullis::dns", sandbox = %self.label, name = %name, qtype = %q.qtype, decision = "allowed", addresses = %addr_list(bound.addrs.iter().map(|(a, _)| a)), "allowed");
        if self.decisions.is_some() {
            let released: Vec<IpAddr> = bound.addrs.iter().map(|(a, _)| *a).collect();
            self.decided(&name, &q, "allowed", &released);
        }
        self.note(|r| {
            for (a, _) in &bound.addrs {
                if r.names_of.len() < MAX_REPORT_ENTRIES || r.names_of.contains_key(a) {
                    let names = r.names_of.entry(*a).or_default();
                    // Shared addresses (CDNs) collect names; a few are enough to explain a flow.
                    if names.len() < 8 {
                        names.insert(name.clone());
                    }
                }
            }
            DnsReport::count(&mut r.allowed, &mut r.unlisted, name);
        });
        Some(wire)
    }

    /// Applies the policy to an answer that a resolver gave a client of this sandbox (seen
    /// over dnstap, after the fact): an allowed name's addresses, bound through its CNAME
    /// chain exactly as the relay binds them, go into the sets with the relay's timeouts and
    /// expiry map (never shortening a live element). Nothing is forwarded or answered.
    pub fn open_answer(&self, cfg: &RelayConfig, response: &[u8]) -> AnswerOutcome {
        use hickory_proto::op::MessageType;
        let Ok(msg) = Message::from_vec(response) else {
            return AnswerOutcome::Ignored("not a DNS message");
        };
        if msg.metadata.message_type != MessageType::Response {
            return AnswerOutcome::Ignored("not a response");
        }
        if msg.metadata.response_code != ResponseCode::NoError {
            return AnswerOutcome::Ignored("not NOERROR");
        }
        let [question] = msg.queries.as_slice() else {
            return AnswerOutcome::Ignored("not exactly one question");
        };
        let qname = question.name.clone();
        let qtype = question.query_type;
        let name = shown(&qname);
        let denied = |via: Option<String>| {
            match via {
                Some(via) => {
                    tracing::info!(target: "portcullis::dns", sandbox = %self.label, name = %name, qtype = %qtype, decision = "denied", via = %via, "denied: CNAME into a denied name")
                }
                None => {
                    tracing::info!(target: "portcullis::dns", sandbox = %self.label, name = %name, qtype = %qtype, decision = "denied", "denied")
                }
            }
            if let Some(d) = &self.decisions {
                d.decided(&name, &qtype.to_string(), "denied", &[]);
            }
            self.note(|r| DnsReport::count(&mut r.denied, &mut r.unlisted, name.clone()));
            AnswerOutcome::Denied { name: name.clone() }
        };
        let (policy, generation) = self.versioned();
        let Ok(domain) = DomainName::from_wire_labels(qname.iter()) else {
            return denied(None);
        };
        let Decision::Allow(access) = policy.decide(&domain) else {
            return denied(None);
        };
        let bound = answer::bound_addresses(&msg, &qname);
        for link in &bound.chain {
            if DomainName::from_wire_labels(link.iter())
                .is_ok_and(|n| policy.is_denied_explicitly(&n))
            {
                return denied(Some(shown(link)));
            }
        }
        let (refused, addrs): (Vec<_>, Vec<_>) = bound
            .addrs
            .iter()
            .partition(|(ip, _)| answer::never_by_name(ip) && !Self::cidr_allows(&policy, ip));
        if !refused.is_empty() {
            tracing::warn!(target: "portcullis::dns", sandbox = %self.label, name = %name, addresses = %addr_list(refused.iter().map(|(a, _)| a)), "answer points at addresses never opened by name: not opened");
        }
        let opener = Opener {
            name: &domain,
            access: &access,
            generation,
        };
        if let Err(e) = self.open(cfg, &opener, &addrs) {
            tracing::error!(target: "portcullis::dns", sandbox = %self.label, name = %name, qtype = %qtype, decision = "failed", error = %e, "set insertion failed");
            if let Some(d) = &self.decisions {
                d.decided(&name, &qtype.to_string(), "failed", &[]);
            }
            self.note(|r| DnsReport::count(&mut r.failed, &mut r.unlisted, name.clone()));
            return AnswerOutcome::Failed {
                name,
                error: e.to_string(),
            };
        }
        let ips: Vec<IpAddr> = addrs.iter().map(|(a, _)| *a).collect();
        tracing::info!(target: "portcullis::dns", sandbox = %self.label, name = %name, qtype = %qtype, decision = "allowed", addresses = %addr_list(&ips), "allowed");
        if let Some(d) = &self.decisions {
            d.decided(&name, &qtype.to_string(), "allowed", &ips);
        }
        self.note(|r| DnsReport::count(&mut r.allowed, &mut r.unlisted, name.clone()));
        AnswerOutcome::Allowed { name, addrs: ips }
    }

    fn deny(&self, cfg: &RelayConfig, q: &answer::Query, id: u16, name: String) -> Vec<u8> {
        tracing::info!(target: "portcullis::dns", sandbox = %self.label, name = %name, qtype = %q.qtype, decision = "denied", "denied");
        self.decided(&name, q, "denied", &[]);
        self.note(|r| DnsReport::count(&mut r.denied, &mut r.unlisted, name));
        answer::error_reply(id, Some(q), cfg.deny_rcode)
    }

    /// Puts the addresses into the sets (those not already live for longer), waiting for
    /// the kernel's acknowledgement, and remembers which name opened them.
    fn open(
        &self,
        cfg: &RelayConfig,
        o: &Opener<'_>,
        addrs: &[(IpAddr, u32)],
    ) -> portcullis_kernel::Result<()> {
        if addrs.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let name = Arc::new(o.name.clone());
        let mut elements = Vec::new();
        {
            let mut expiry = self.expiry()?;
            for (addr, ttl) in addrs {
                let secs = (*ttl).clamp(cfg.min_ttl, cfg.max_ttl.max(cfg.min_ttl));
                let timeout = Duration::from_secs(u64::from(secs)) + GRACE;
                for key in access_keys(o.access, *addr) {
                    // Re-adding an element replaces its timeout even with a shorter one, so
                    // only ever write a later expiry; and skip refreshes that extend it by no
                    // more than GRACE (a repeated answer asked a moment later): the element
                    // then still outlives the TTL the client was given.
                    if let Some(live) = expiry.get_mut(&key)
                        && live.until + GRACE >= now + timeout
                    {
                        live.note_name(&name);
                        continue;
                    }
                    elements.push(Element { key, timeout });
                }
            }
        }
        if elements.is_empty() {
            return Ok(());
        }
        self.writer.add(&self.sets, &elements)?;
        let mut expiry = self.expiry()?;
        let (policy, generation) = self.versioned();
        if generation != o.generation {
            // The policy changed while this answer was on its way: its revocation scan may
            // have missed these elements (not in the map yet), or removed from the kernel a
            // key just written. Keep what the current policy grants this name, written
            // again; take back the rest; and release nothing (SERVFAIL: the client asks
            // again and gets the new policy's answer).
            return self.recheck(&mut expiry, &policy, &name, elements, now);
        }
        for e in &elements {
            record(&mut expiry, e.key, now + e.timeout, &name, now);
        }
        // Forget expired entries now and then, so the map stays as large as the live sets.
        if self.inserts.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            expiry.retain(|_, live| live.until > now);
        }
        Ok(())
    }

    /// `open`'s rare path: elements written under a policy that has since been swapped.
    fn recheck(
        &self,
        expiry: &mut HashMap<ElementKey, Live>,
        policy: &Policy,
        name: &Arc<DomainName>,
        elements: Vec<Element>,
        now: Instant,
    ) -> portcullis_kernel::Result<()> {
        let granted = match policy.decide(name) {
            Decision::Allow(a) => Some(a),
            Decision::Deny { .. } => None,
        };
        let (keep, rest): (Vec<Element>, Vec<Element>) = elements
            .into_iter()
            .partition(|e| granted.as_ref().is_some_and(|a| covers(a, &e.key)));
        // Another name's live element survived the scan (or came after it): it stays.
        let stale: Vec<ElementKey> = rest
            .iter()
            .filter(|e| expiry.get(&e.key).is_none_or(|l| l.until <= now))
            .map(|e| e.key)
            .collect();
        if !keep.is_empty() {
            let keep: Vec<Element> = keep
                .into_iter()
                .map(|e| Element {
                    key: e.key,
                    timeout: e.timeout.max(
                        expiry
                            .get(&e.key)
                            .map_or(Duration::ZERO, |l| l.until.saturating_duration_since(now)),
                    ),
                })
                .collect();
            self.writer.add(&self.sets, &keep)?;
            for e in &keep {
                record(expiry, e.key, now + e.timeout, name, now);
            }
        }
        if !stale.is_empty() {
            self.writer.remove(&self.sets, &stale)?;
        }
        if granted.is_some() && rest.is_empty() {
            // Still granted all it wrote: the answer may go.
            return Ok(());
        }
        Err(portcullis_kernel::Error::Other(format!(
            "the policy changed while answering {name}: answer withheld, {} elements taken back",
            stale.len()
        )))
    }

    fn expiry(
        &self,
    ) -> portcullis_kernel::Result<std::sync::MutexGuard<'_, HashMap<ElementKey, Live>>> {
        self.expiry
            .lock()
            .map_err(|_| portcullis_kernel::Error::Other("expiry map poisoned".into()))
    }

    /// Swaps the policy, then revokes every live element that no name which opened it is
    /// still granted under the new policy: removed from the kernel sets and forgotten.
    ///
    /// The swap comes first, so a query arriving meanwhile already decides with the new
    /// policy; a query decided under the old one that writes after the scan notices the
    /// swap by its generation and takes back what it wrote (see `open`). The expiry map
    /// stays locked during the kernel writes (a millisecond for a hundred keys): queries
    /// that need to write wait for the revocation to finish.
    ///
    /// An element some of whose names are not remembered (more than
    /// `MAX_NAMES_PER_ELEMENT`) is kept only if a remembered name still grants it: revoking
    /// too much fails closed, and the next query opens it again.
    ///
    /// The caller then cuts the live flows: `conntrack::delete_flows(peers, &revoked.keys,
    /// &revoked.narrowed)` in the sandbox's host namespace. On error the policy is swapped
    /// but the elements not removed are still remembered: calling `set_policy` again with
    /// `policy()` retries.
    pub fn set_policy(&self, policy: Arc<Policy>) -> portcullis_kernel::Result<Revoked> {
        {
            let mut v = self.policy.write().unwrap_or_else(|e| e.into_inner());
            v.policy = policy;
            v.generation += 1;
        }
        if self.observer.is_some() {
            // Learning: nothing is in the sets.
            return Ok(Revoked::default());
        }
        let mut expiry = self.expiry()?;
        // The policy now in force: when two swaps race, the later scan decides with the later
        // policy, whichever call it belongs to.
        let (policy, _) = self.versioned();
        let now = Instant::now();
        expiry.retain(|_, live| live.until > now);
        let mut decisions: HashMap<Arc<DomainName>, Option<Access>> = HashMap::new();
        let mut access_of = |n: &Arc<DomainName>| -> Option<Access> {
            decisions
                .entry(n.clone())
                .or_insert_with(|| match policy.decide(n) {
                    Decision::Allow(a) => Some(a),
                    Decision::Deny { .. } => None,
                })
                .clone()
        };
        let mut revoked = Vec::new();
        // Narrowed keys: (key, until, name).
        let mut narrowed: Vec<(ElementKey, Instant, Arc<DomainName>)> = Vec::new();
        for (key, live) in expiry.iter() {
            let mut kept = false;
            let mut ports = Vec::new();
            for n in &live.names {
                match access_of(n) {
                    Some(a) if covers(&a, key) => {
                        kept = true;
                        break;
                    }
                    Some(a) => ports.push((a, n)),
                    None => {}
                }
            }
            if kept {
                continue;
            }
            revoked.push(*key);
            if let ElementKey::Addr(addr) = key {
                for (a, n) in ports {
                    for (proto, port) in &a.ports {
                        narrowed.push((
                            ElementKey::AddrPort(*addr, *proto, *port),
                            live.until,
                            n.clone(),
                        ));
                    }
                }
            }
        }
        // A port key that one name lost but another now gets by narrowing stays.
        revoked.retain(|k| !narrowed.iter().any(|(n, ..)| n == k));
        if revoked.is_empty() {
            return Ok(Revoked::default());
        }
        // The narrower elements go in before the wide one goes, so that what stays allowed
        // never blinks. Failing here only loses them until the next query: go on revoking.
        let mut narrowed_keys: Vec<ElementKey> = Vec::new();
        let additions: Vec<Element> = {
            let mut longest: HashMap<ElementKey, Instant> = HashMap::new();
            for (k, until, _) in &narrowed {
                if expiry.get(k).is_some_and(|l| l.until >= *until) {
                    continue;
                }
                let slot = longest.entry(*k).or_insert(*until);
                *slot = (*slot).max(*until);
            }
            longest
                .into_iter()
                .map(|(key, until)| Element {
                    key,
                    timeout: until.saturating_duration_since(now),
                })
                .collect()
        };
        let narrowing_ok = match self.writer.add(&self.sets, &additions) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(target: "portcullis::dns", sets = %self.sets, error = %e, "policy swap: could not add the narrowed elements");
                false
            }
        };
        self.writer.remove(&self.sets, &revoked)?;
        for k in &revoked {
            expiry.remove(k);
        }
        if narrowing_ok {
            for (k, until, n) in &narrowed {
                record(&mut expiry, *k, *until, n, now);
                if !narrowed_keys.contains(k) {
                    narrowed_keys.push(*k);
                }
            }
        }
        revoked.sort_unstable();
        narrowed_keys.sort_unstable();
        Ok(Revoked {
            keys: revoked,
            narrowed: narrowed_keys,
        })
    }

    /// The live elements, for the daemon to keep across a restart.
    /// How many elements the relay holds open (unexpired) in the sandbox's sets.
    pub fn live_elements(&self) -> usize {
        let now = Instant::now();
        self.expiry()
            .map(|e| e.values().filter(|v| v.until > now).count())
            .unwrap_or(0)
    }

    pub fn snapshot(&self) -> Vec<SavedElement> {
        let now = Instant::now();
        let Ok(expiry) = self.expiry() else {
            return Vec::new();
        };
        let mut saved: Vec<SavedElement> = expiry
            .iter()
            .filter(|(_, live)| live.until > now)
            .map(|(key, live)| SavedElement {
                key: *key,
                remaining_ms: u64::try_from(live.until.duration_since(now).as_millis())
                    .unwrap_or(u64::MAX),
                names: live.names.iter().map(|n| (**n).clone()).collect(),
                unknown_names: live.unknown_names,
            })
            .collect();
        saved.sort_by_key(|a| a.key);
        saved
    }

    /// Refills the expiry map from a `snapshot` (after a restart of the daemon); expired
    /// elements are skipped. With `write_to_kernel`, the elements are also written to the
    /// sets with their remaining time (the sets were recreated); without, the sets are
    /// assumed to still hold them. If the policy may have changed meanwhile, call
    /// `set_policy` afterwards.
    pub fn restore(
        &self,
        saved: Vec<SavedElement>,
        write_to_kernel: bool,
    ) -> portcullis_kernel::Result<()> {
        let now = Instant::now();
        let saved: Vec<SavedElement> = saved.into_iter().filter(|s| s.remaining_ms > 0).collect();
        let mut expiry = self.expiry()?;
        if write_to_kernel {
            let elements: Vec<Element> = saved
                .iter()
                .map(|s| Element {
                    key: s.key,
                    timeout: Duration::from_millis(s.remaining_ms),
                })
                .collect();
            if !elements.is_empty() {
                self.writer.add(&self.sets, &elements)?;
            }
        }
        for s in saved {
            let until = now + Duration::from_millis(s.remaining_ms);
            let live = expiry.entry(s.key).or_insert_with(|| Live {
                until,
                names: Vec::new(),
                unknown_names: false,
            });
            live.until = live.until.max(until);
            live.unknown_names |= s.unknown_names;
            for n in s.names {
                live.note_name(&Arc::new(n));
            }
        }
        Ok(())
    }
}

/// Who asks `open` to write: the queried name, its access, and the generation of the policy
/// that decided it.
#[derive(Debug)]
struct Opener<'a> {
    name: &'a DomainName,
    access: &'a Access,
    generation: u64,
}

/// Notes in the map that `name` opened `key` until `until` (never shortening it). An expired
/// entry starts afresh: the names that opened it before no longer count.
fn record(
    expiry: &mut HashMap<ElementKey, Live>,
    key: ElementKey,
    until: Instant,
    name: &Arc<DomainName>,
    now: Instant,
) {
    let live = expiry.entry(key).or_insert_with(|| Live {
        until,
        names: Vec::new(),
        unknown_names: false,
    });
    if live.until <= now {
        live.names.clear();
        live.unknown_names = false;
    }
    live.until = live.until.max(until);
    live.note_name(name);
}

/// Whether `access` lets the sandbox use what `key` opens. An address-port key is covered by
/// every-port access too (it then allows less than the name may use, never more).
fn covers(access: &Access, key: &ElementKey) -> bool {
    match key {
        ElementKey::Addr(_) => access.any_port,
        ElementKey::AddrPort(_, proto, port) => {
            access.any_port || access.ports.contains(&(*proto, *port))
        }
    }
}

/// The set keys an allowed address gets: the address itself, or one key per allowed port.
fn access_keys(access: &Access, addr: IpAddr) -> Vec<ElementKey> {
    if access.any_port {
        vec![ElementKey::Addr(addr)]
    } else {
        access
            .ports
            .iter()
            .map(|(proto, port)| ElementKey::AddrPort(addr, *proto, *port))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    //! The relay's invariants without root: a recording `SetWriter` stands in for netlink, and
    //! a fake upstream on 127.0.0.1 answers with whatever TTL the test sets.

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicU32};

    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use portcullis_policy::Rule;

    use super::*;

    #[derive(Debug, Default)]
    struct Recorder {
        batches: Mutex<Vec<Vec<Element>>>,
        removals: Mutex<Vec<Vec<ElementKey>>>,
        fail: AtomicBool,
        /// Runs inside the next `add`, before it returns (the in-flight race).
        during_add: Mutex<Option<Hook>>,
        /// What the sets hold, as far as the recorder saw.
        live: Mutex<BTreeSet<ElementKey>>,
    }

    struct Hook(Box<dyn FnOnce() + Send>);

    impl std::fmt::Debug for Hook {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Hook")
        }
    }

    impl SetWriter for Recorder {
        fn add(&self, _at: &SetsAt, elements: &[Element]) -> portcullis_kernel::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(portcullis_kernel::Error::Other("set is full".into()));
            }
            self.batches.lock().unwrap().push(elements.to_vec());
            self.live
                .lock()
                .unwrap()
                .extend(elements.iter().map(|e| e.key));
            let hook = self.during_add.lock().unwrap().take();
            if let Some(Hook(hook)) = hook {
                hook();
            }
            Ok(())
        }

        fn remove(&self, _at: &SetsAt, keys: &[ElementKey]) -> portcullis_kernel::Result<()> {
            self.removals.lock().unwrap().push(keys.to_vec());
            let mut live = self.live.lock().unwrap();
            for k in keys {
                live.remove(k);
            }
            Ok(())
        }
    }

    impl Recorder {
        fn live(&self) -> BTreeSet<ElementKey> {
            self.live.lock().unwrap().clone()
        }
    }

    /// Answers every query with one A record, 198.51.100.7, with the current `ttl`.
    async fn fake_upstream(
        ttl: Arc<AtomicU32>,
        seen: Arc<AtomicU64>,
        with: Arc<Mutex<std::net::Ipv4Addr>>,
    ) -> SocketAddr {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                seen.fetch_add(1, Ordering::SeqCst);
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut a = Message::response(q.metadata.id, q.metadata.op_code);
                a.queries = q.queries.clone();
                let name = q.queries[0].name.clone();
                a.answers.push(Record::from_rdata(
                    name,
                    ttl.load(Ordering::SeqCst),
                    RData::A(A(*with.lock().unwrap())),
                ));
                sock.send_to(&a.to_vec().unwrap(), peer).await.unwrap();
            }
        });
        addr
    }

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    fn rcode(reply: &[u8]) -> ResponseCode {
        Message::from_vec(reply).unwrap().metadata.response_code
    }

    struct Setup {
        ctx: SandboxCtx,
        cfg: RelayConfig,
        writer: Arc<Recorder>,
        ttl: Arc<AtomicU32>,
        seen: Arc<AtomicU64>,
        answer_with: Arc<Mutex<std::net::Ipv4Addr>>,
    }

    impl Setup {
        /// The relay's reply to an A query for `name` over UDP.
        async fn ask(&self, name: &str) -> Vec<u8> {
            self.ctx
                .handle(&self.cfg, &query(name), false)
                .await
                .unwrap()
        }
    }

    async fn setup(policy: Policy) -> Setup {
        let (ttl, seen) = (Arc::new(AtomicU32::new(100)), Arc::new(AtomicU64::new(0)));
        let answer_with = Arc::new(Mutex::new("198.51.100.7".parse().unwrap()));
        let up = fake_upstream(ttl.clone(), seen.clone(), answer_with.clone()).await;
        let writer = Arc::new(Recorder::default());
        let ctx = SandboxCtx::new(
            SetsAt::table("portcullis_0a1b2c3d"),
            vec![],
            Arc::new(policy),
            writer.clone(),
        );
        let cfg = RelayConfig {
            upstreams: vec![up],
            min_ttl: 1,
            ..RelayConfig::default()
        };
        Setup {
            ctx,
            cfg,
            writer,
            ttl,
            seen,
            answer_with,
        }
    }

    fn allow(patterns: &[&str]) -> Policy {
        Policy::new(
            patterns
                .iter()
                .map(|p| Rule::parse_allow_arg(p).unwrap())
                .collect(),
        )
    }

    #[tokio::test]
    async fn a_shorter_answer_never_shortens_a_live_element() {
        let s = setup(allow(&["ok.test"])).await;
        let any = Access {
            any_port: true,
            ports: Default::default(),
        };
        let addr: IpAddr = "198.51.100.7".parse().unwrap();
        let name = DomainName::parse("ok.test").unwrap();
        let o = Opener {
            name: &name,
            access: &any,
            generation: 0,
        };
        for ttl in [100, 10, 100, 500] {
            s.ctx.open(&s.cfg, &o, &[(addr, ttl)]).unwrap();
        }
        let batches = s.writer.batches.lock().unwrap().clone();
        let timeouts: Vec<u64> = batches.iter().map(|b| b[0].timeout.as_secs()).collect();
        // 100 s (+1 s grace) written; 10 s skipped (it would shorten); the same 100 s a moment
        // later skipped (nothing to gain); 500 s written.
        assert_eq!(timeouts, vec![101, 501]);
        assert_eq!(batches[0][0].key, ElementKey::Addr(addr));
    }

    #[tokio::test]
    async fn a_cached_answer_skips_the_upstream_but_not_the_sets() {
        let s = setup(allow(&["ok.test"])).await;
        s.ask("ok.test.").await;
        let reply = s.ask("OK.test.").await;
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.answers.len(), 1, "answered from the cache");
        assert_eq!(
            s.seen.load(Ordering::SeqCst),
            1,
            "the upstream was asked once"
        );
        // The element written for the first answer is still live, so the hit wrote nothing;
        // once the sets refuse, a hit fails closed like a fresh answer.
        assert_eq!(s.writer.batches.lock().unwrap().len(), 1);
        s.ctx.expiry.lock().unwrap().clear();
        s.writer.fail.store(true, Ordering::SeqCst);
        let reply = s.ask("ok.test.").await;
        assert_eq!(rcode(&reply), ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn ttls_above_max_ttl_reach_the_client_lowered() {
        let s = setup(allow(&["ok.test"])).await;
        s.ttl.store(200_000, Ordering::SeqCst);
        let reply = s.ask("ok.test.").await;
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(
            m.answers[0].ttl, s.cfg.max_ttl,
            "no client caches longer than its element lives"
        );
        let batches = s.writer.batches.lock().unwrap().clone();
        assert_eq!(
            batches[0][0].timeout.as_secs(),
            u64::from(s.cfg.max_ttl) + 1
        );
    }

    #[tokio::test]
    async fn rebinding_onto_the_metadata_address_opens_nothing() {
        let s = setup(allow(&["ok.test"])).await;
        *s.answer_with.lock().unwrap() = "169.254.169.254".parse().unwrap();
        let reply = s.ask("ok.test.").await;
        let m = Message::from_vec(&reply).unwrap();
        assert!(m.answers.is_empty(), "the record was removed");
        assert!(
            s.writer.batches.lock().unwrap().is_empty(),
            "nothing was opened"
        );
        assert_eq!(
            s.ctx
                .report()
                .refused_addresses
                .get("ok.test -> 169.254.169.254"),
            Some(&1)
        );
        // A CIDR rule allows it explicitly.
        let s = setup(allow(&["ok.test", "169.254.169.254"])).await;
        *s.answer_with.lock().unwrap() = "169.254.169.254".parse().unwrap();
        let reply = s.ask("ok.test.").await;
        assert_eq!(Message::from_vec(&reply).unwrap().answers.len(), 1);
    }

    #[test]
    fn report_maps_stay_bounded() {
        let mut r = DnsReport::default();
        for i in 0..MAX_REPORT_ENTRIES + 5 {
            DnsReport::count(&mut r.allowed, &mut r.unlisted, format!("n{i}.test"));
        }
        DnsReport::count(&mut r.allowed, &mut r.unlisted, "n0.test".into());
        assert_eq!(r.allowed.len(), MAX_REPORT_ENTRIES);
        assert_eq!(r.unlisted, 5);
        assert_eq!(
            r.allowed["n0.test"], 2,
            "names already listed keep counting"
        );
    }

    #[tokio::test]
    async fn a_failed_insertion_is_servfail_and_releases_no_address() {
        let s = setup(allow(&["ok.test"])).await;
        s.writer.fail.store(true, Ordering::SeqCst);
        let reply = s.ask("ok.test.").await;
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(m.answers.is_empty(), "no address may reach the sandbox");
        assert_eq!(s.ctx.report().failed.get("ok.test"), Some(&1));
    }

    #[tokio::test]
    async fn denied_names_never_reach_the_upstream() {
        let s = setup(allow(&["ok.test", "*.wild.test"])).await;
        for name in ["sub.ok.test.", "evil.test.", "a.b.wild.test.", "wild.test."] {
            let reply = s.ask(name).await;
            assert_eq!(rcode(&reply), ResponseCode::NXDomain, "{name}");
        }
        assert_eq!(
            s.seen.load(Ordering::SeqCst),
            0,
            "a denied query left the relay"
        );
        assert!(s.writer.batches.lock().unwrap().is_empty());
        assert_eq!(s.ctx.report().denied.len(), 4);
        let reply = s.ask("x.wild.test.").await;
        assert_eq!(rcode(&reply), ResponseCode::NoError);
        assert_eq!(s.seen.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn port_rules_open_address_protocol_and_port_only() {
        let policy = Policy::from_toml_str(
            "[[allow]]\ndomain = \"api.test\"\nports = [443]\nprotocols = [\"tcp\"]\n",
            "policy.toml",
        )
        .unwrap();
        let s = setup(policy).await;
        s.ask("api.test.").await;
        let batches = s.writer.batches.lock().unwrap().clone();
        assert_eq!(
            batches[0][0].key,
            ElementKey::AddrPort(
                "198.51.100.7".parse().unwrap(),
                portcullis_policy::Protocol::Tcp,
                443
            )
        );
        assert_eq!(batches[0].len(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_prompt_servfail() {
        let policy = allow(&["ok.test"]);
        let writer = Arc::new(Recorder::default());
        let ctx = SandboxCtx::new(SetsAt::table("t"), vec![], Arc::new(policy), writer);
        // A bound socket that never answers: the attempt times out.
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let cfg = RelayConfig {
            upstreams: vec![silent.local_addr().unwrap()],
            upstream_timeout: Duration::from_millis(200),
            ..RelayConfig::default()
        };
        let reply = ctx.handle(&cfg, &query("ok.test."), false).await.unwrap();
        assert_eq!(rcode(&reply), ResponseCode::ServFail);
    }

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    impl Setup {
        /// Asks `name` with the upstream answering `addr`.
        async fn ask_answered(&self, name: &str, addr: &str) -> Vec<u8> {
            *self.answer_with.lock().unwrap() = addr.parse().unwrap();
            self.ask(name).await
        }
    }

    #[tokio::test]
    async fn a_swap_revokes_exactly_what_only_removed_rules_allowed() {
        let s = setup(allow(&["a.test", "b.test", "c.test"])).await;
        s.ask_answered("a.test.", "198.51.100.7").await;
        s.ask_answered("b.test.", "198.51.100.8").await;
        // c.test shares b.test's address (a CDN).
        s.ask_answered("c.test.", "198.51.100.8").await;
        let revoked = s.ctx.set_policy(Arc::new(allow(&["c.test"]))).unwrap();
        assert_eq!(revoked.keys, vec![ElementKey::Addr(v4("198.51.100.7"))]);
        assert!(revoked.narrowed.is_empty());
        assert_eq!(
            s.writer.live(),
            BTreeSet::from([ElementKey::Addr(v4("198.51.100.8"))]),
            "c.test still grants the shared address"
        );
        // The new policy decides new queries.
        assert_eq!(
            rcode(&s.ask_answered("a.test.", "198.51.100.7").await),
            ResponseCode::NXDomain
        );
        assert!(matches!(
            s.ctx.policy().decide(&DomainName::parse("c.test").unwrap()),
            Decision::Allow(_)
        ));
        // Nothing left to revoke under the same policy; then the shared address goes too.
        assert!(
            s.ctx
                .set_policy(Arc::new(allow(&["c.test"])))
                .unwrap()
                .keys
                .is_empty()
        );
        let revoked = s.ctx.set_policy(Arc::new(allow(&["a.test"]))).unwrap();
        assert_eq!(revoked.keys, vec![ElementKey::Addr(v4("198.51.100.8"))]);
        assert!(s.writer.live().is_empty());
        assert!(s.ctx.snapshot().is_empty(), "revoked keys are forgotten");
    }

    fn with_ports(name: &str, ports: &str) -> Policy {
        Policy::from_toml_str(
            &format!("[[allow]]\ndomain = \"{name}\"\nports = [{ports}]\nprotocols = [\"tcp\"]\n"),
            "policy.toml",
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_swap_to_port_rules_keeps_the_ports_and_loses_the_address() {
        let s = setup(allow(&["api.test"])).await;
        s.ask_answered("api.test.", "198.51.100.7").await;
        let addr = v4("198.51.100.7");
        let tcp443 = ElementKey::AddrPort(addr, portcullis_policy::Protocol::Tcp, 443);
        let revoked = s
            .ctx
            .set_policy(Arc::new(with_ports("api.test", "443")))
            .unwrap();
        assert_eq!(revoked.keys, vec![ElementKey::Addr(addr)]);
        assert_eq!(revoked.narrowed, vec![tcp443]);
        assert_eq!(s.writer.live(), BTreeSet::from([tcp443]));
        // The port element lives as long as the address element had left, not longer.
        let added = s.writer.batches.lock().unwrap().last().unwrap().clone();
        assert_eq!(added[0].key, tcp443);
        assert!(added[0].timeout <= Duration::from_secs(101));
        // 443 and 80, then 443 only: the port-80 element goes, 443 stays.
        let s = setup(with_ports("api.test", "443, 80")).await;
        s.ask_answered("api.test.", "198.51.100.7").await;
        let revoked = s
            .ctx
            .set_policy(Arc::new(with_ports("api.test", "443")))
            .unwrap();
        assert_eq!(
            revoked.keys,
            vec![ElementKey::AddrPort(
                addr,
                portcullis_policy::Protocol::Tcp,
                80
            )]
        );
        assert_eq!(s.writer.live(), BTreeSet::from([tcp443]));
        // Every port again: the port element is covered, nothing is revoked.
        let revoked = s.ctx.set_policy(Arc::new(allow(&["api.test"]))).unwrap();
        assert!(revoked.keys.is_empty());
    }

    #[tokio::test]
    async fn an_address_with_more_names_than_remembered_is_revoked_unless_a_known_one_grants_it() {
        let names: Vec<String> = (0..=MAX_NAMES_PER_ELEMENT)
            .map(|i| format!("n{i}.test"))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let s = setup(allow(&refs)).await;
        for n in &names {
            s.ask_answered(&format!("{n}."), "198.51.100.7").await;
        }
        let saved = s.ctx.snapshot();
        assert_eq!(saved[0].names.len(), MAX_NAMES_PER_ELEMENT);
        assert!(saved[0].unknown_names);
        // A remembered name still grants it: kept.
        assert!(
            s.ctx
                .set_policy(Arc::new(allow(&["n0.test"])))
                .unwrap()
                .keys
                .is_empty()
        );
        // Only the forgotten ninth name grants it: revoked (fail-closed; its next query
        // opens it again).
        let last = names.last().unwrap().as_str();
        let revoked = s.ctx.set_policy(Arc::new(allow(&[last]))).unwrap();
        assert_eq!(revoked.keys, vec![ElementKey::Addr(v4("198.51.100.7"))]);
        s.ask_answered(&format!("{last}."), "198.51.100.7").await;
        assert_eq!(
            s.writer.live(),
            BTreeSet::from([ElementKey::Addr(v4("198.51.100.7"))])
        );
    }

    /// A context whose writer runs `swap` in the middle of the next `add`: a query decided
    /// under the old policy writes its element after the swap's revocation scan.
    async fn racing(policy: Policy, swap_to: Policy) -> (Arc<SandboxCtx>, Setup) {
        let s = setup(policy).await;
        let ctx = Arc::new(SandboxCtx::new(
            SetsAt::table("portcullis_0a1b2c3d"),
            vec![],
            s.ctx.policy(),
            s.writer.clone(),
        ));
        let swapping = ctx.clone();
        let swap_to = Arc::new(swap_to);
        *s.writer.during_add.lock().unwrap() = Some(Hook(Box::new(move || {
            let revoked = swapping.set_policy(swap_to).unwrap();
            assert!(
                revoked.keys.is_empty(),
                "the element was not in the map yet"
            );
        })));
        (ctx, s)
    }

    #[tokio::test]
    async fn an_answer_in_flight_during_a_swap_takes_back_what_the_new_policy_denies() {
        let (ctx, s) = racing(allow(&["a.test"]), allow(&["b.test"])).await;
        let reply = ctx.handle(&s.cfg, &query("a.test."), false).await.unwrap();
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(m.answers.is_empty(), "no address released");
        assert!(s.writer.live().is_empty(), "the element was taken back");
        assert!(ctx.snapshot().is_empty());
    }

    #[tokio::test]
    async fn an_answer_in_flight_during_a_swap_that_still_allows_it_goes_out() {
        let (ctx, s) = racing(allow(&["a.test"]), allow(&["a.test", "b.test"])).await;
        let reply = ctx.handle(&s.cfg, &query("a.test."), false).await.unwrap();
        assert_eq!(rcode(&reply), ResponseCode::NoError);
        let key = ElementKey::Addr(v4("198.51.100.7"));
        assert_eq!(s.writer.live(), BTreeSet::from([key]));
        // Remembered with its name: the next swap that drops a.test revokes it.
        assert_eq!(
            ctx.snapshot()[0].names,
            vec![DomainName::parse("a.test").unwrap()]
        );
        let revoked = ctx.set_policy(Arc::new(allow(&["b.test"]))).unwrap();
        assert_eq!(revoked.keys, vec![key]);
    }

    #[tokio::test]
    async fn snapshot_and_restore_round_trip() {
        let s = setup(allow(&["a.test", "b.test", "c.test"])).await;
        s.ask_answered("a.test.", "198.51.100.7").await;
        s.ask_answered("b.test.", "198.51.100.7").await;
        s.ask_answered("c.test.", "198.51.100.8").await;
        let saved = s.ctx.snapshot();
        assert_eq!(saved.len(), 2);
        let json = serde_json::to_string(&saved).unwrap();
        let mut back: Vec<SavedElement> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        // An element that expired while the daemon was down is skipped.
        back.push(SavedElement {
            key: ElementKey::Addr(v4("198.51.100.9")),
            remaining_ms: 0,
            names: vec![DomainName::parse("a.test").unwrap()],
            unknown_names: false,
        });

        let writer = Arc::new(Recorder::default());
        let ctx = SandboxCtx::new(
            SetsAt::table("portcullis_0a1b2c3d"),
            vec![],
            Arc::new(allow(&["a.test", "b.test", "c.test"])),
            writer.clone(),
        );
        ctx.restore(back.clone(), false).unwrap();
        assert!(writer.batches.lock().unwrap().is_empty(), "nothing written");
        let again = SandboxCtx::new(
            SetsAt::table("portcullis_0a1b2c3d"),
            vec![],
            Arc::new(allow(&["a.test", "b.test", "c.test"])),
            writer.clone(),
        );
        again.restore(back, true).unwrap();
        let written = writer.batches.lock().unwrap()[0].clone();
        assert_eq!(written.len(), 2);
        for e in &written {
            assert!(e.timeout <= Duration::from_secs(101) && e.timeout > Duration::from_secs(90));
        }
        let restored = ctx.snapshot();
        assert_eq!(
            restored
                .iter()
                .map(|e| (e.key, e.names.clone()))
                .collect::<Vec<_>>(),
            saved
                .iter()
                .map(|e| (e.key, e.names.clone()))
                .collect::<Vec<_>>()
        );
        assert!(
            restored
                .iter()
                .zip(&saved)
                .all(|(r, s)| r.remaining_ms <= s.remaining_ms)
        );
        // The names came back: dropping c.test revokes the address only it opened.
        let revoked = ctx.set_policy(Arc::new(allow(&["a.test"]))).unwrap();
        assert_eq!(revoked.keys, vec![ElementKey::Addr(v4("198.51.100.8"))]);
    }

    #[derive(Debug, Default)]
    struct TapRecorder(Mutex<Vec<(TapKind, String, SocketAddr, bool)>>);

    impl DnsTap for TapRecorder {
        fn tap(&self, e: &TapEvent<'_>) {
            assert_eq!(e.response.is_some(), e.response_time.is_some());
            self.0.lock().unwrap().push((
                e.kind,
                e.sandbox.to_owned(),
                e.peer,
                e.response.is_some(),
            ));
        }
    }

    #[tokio::test]
    async fn the_tap_sees_client_and_forwarder_messages_with_the_label() {
        let mut s = setup(allow(&["ok.test"])).await;
        let tap = Arc::new(TapRecorder::default());
        s.ctx = s.ctx.with_label("build-42").with_tap(tap.clone());
        let client: SocketAddr = "203.0.113.130:5353".parse().unwrap();
        let up = s.cfg.upstreams[0];
        s.ctx
            .handle_from(&s.cfg, &query("ok.test."), false, client)
            .await
            .unwrap();
        // A denied name and a cache hit are never forwarded.
        s.ctx
            .handle_from(&s.cfg, &query("no.test."), false, client)
            .await
            .unwrap();
        s.ctx
            .handle_from(&s.cfg, &query("ok.test."), true, client)
            .await
            .unwrap();
        let seen = tap.0.lock().unwrap().clone();
        let l = "build-42".to_owned();
        assert_eq!(
            seen,
            vec![
                (TapKind::ClientQuery, l.clone(), client, false),
                (TapKind::ForwarderQuery, l.clone(), up, false),
                (TapKind::ForwarderResponse, l.clone(), up, true),
                (TapKind::ClientResponse, l.clone(), client, true),
                (TapKind::ClientQuery, l.clone(), client, false),
                (TapKind::ClientResponse, l.clone(), client, true),
                (TapKind::ClientQuery, l.clone(), client, false),
                (TapKind::ClientResponse, l, client, true),
            ]
        );
    }

    fn response(name: &str, addr: &str, ttl: u32) -> Vec<u8> {
        let mut m = Message::response(7, hickory_proto::op::OpCode::Query);
        let n = Name::from_ascii(name).unwrap();
        m.add_query(Query::query(n.clone(), RecordType::A));
        m.answers.push(Record::from_rdata(
            n,
            ttl,
            RData::A(A(addr.parse().unwrap())),
        ));
        m.to_vec().unwrap()
    }

    #[tokio::test]
    async fn an_answer_seen_over_dnstap_opens_only_allowed_names_and_never_shortens() {
        let s = setup(allow(&["ok.test"])).await;
        let out = s
            .ctx
            .open_answer(&s.cfg, &response("ok.test.", "198.51.100.10", 300));
        assert_eq!(
            out,
            AnswerOutcome::Allowed {
                name: "ok.test".into(),
                addrs: vec!["198.51.100.10".parse().unwrap()]
            }
        );
        let out = s
            .ctx
            .open_answer(&s.cfg, &response("no.test.", "198.51.100.20", 300));
        assert_eq!(
            out,
            AnswerOutcome::Denied {
                name: "no.test".into()
            }
        );
        // The same name again with a shorter TTL writes nothing.
        s.ctx
            .open_answer(&s.cfg, &response("ok.test.", "198.51.100.10", 10));
        let batches = s.writer.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0][0].timeout.as_secs(), 301);
        assert!(matches!(
            s.ctx.open_answer(&s.cfg, &query("ok.test.")),
            AnswerOutcome::Ignored(_)
        ));
        assert!(matches!(
            s.ctx.open_answer(&s.cfg, b"\x00garbage"),
            AnswerOutcome::Ignored(_)
        ));
    }
}
