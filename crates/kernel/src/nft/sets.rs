//! Writing set elements over netlink: the DNS relay's hot path.
//!
//! One persistent `NETLINK_NETFILTER` socket; one batch per DNS answer
//! (BATCH_BEGIN, one NEWSETELEM per set touched with NLM_F_CREATE|NLM_F_ACK, BATCH_END),
//! and the caller waits for the kernel's acknowledgement of every message before the answer
//! is released. The batch is one transaction: either every element is in, or none is.
//!
//! Removing elements (a policy swap's revocation) is one batch too; a missing element
//! (expired meanwhile) aborts it, and it is resent without the missing ones.
//!
//! Kernel behaviour this relies on (see shared/DEPENDENCIES.md): re-adding an element that
//! exists (no NLM_F_EXCL) replaces its timeout, even with a shorter one. Callers therefore only
//! ever write a timeout longer than what is live (the relay keeps the expiry map).

use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::sync::Mutex;
use std::time::Duration;

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload, Nla as _,
    NlasIterator,
};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, RuleAttribute, RuleMessage, SetAttribute, SetMessage,
    TableAttribute, TableMessage,
};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
    SetElementMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use portcullis_policy::Protocol;

use crate::names::{
    SET_ALLOW4, SET_ALLOW4_PORT, SET_ALLOW6, SET_ALLOW6_PORT, SHARED_TABLE, SandboxId,
};
use crate::nft::Family;
use crate::nft::ruleset::{KeyPart, SandboxObjects, skeleton_objects};
use crate::{Error, Result};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// How long the relay waits for the kernel's acknowledgement before failing closed.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// What one element allows: an address, or an address with a protocol and port.
/// Serializable: the daemon keeps the live elements across a restart.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ElementKey {
    Addr(IpAddr),
    AddrPort(IpAddr, Protocol, u16),
}

impl ElementKey {
    /// The set of the sandbox table this key belongs in.
    pub fn set_name(&self) -> &'static str {
        match self {
            ElementKey::Addr(IpAddr::V4(_)) => SET_ALLOW4,
            ElementKey::Addr(IpAddr::V6(_)) => SET_ALLOW6,
            ElementKey::AddrPort(IpAddr::V4(_), ..) => SET_ALLOW4_PORT,
            ElementKey::AddrPort(IpAddr::V6(_), ..) => SET_ALLOW6_PORT,
        }
    }

    /// The key as the kernel stores it: concatenated fields, each padded to 4 bytes.
    fn key_bytes(&self) -> Vec<u8> {
        fn addr(a: &IpAddr) -> Vec<u8> {
            match a {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            }
        }
        match self {
            ElementKey::Addr(a) => addr(a),
            ElementKey::AddrPort(a, proto, port) => {
                let mut k = addr(a);
                k.extend_from_slice(&[proto.number(), 0, 0, 0]);
                k.extend_from_slice(&port.to_be_bytes());
                k.extend_from_slice(&[0, 0]);
                k
            }
        }
    }
}

/// Where a sandbox's dynamic sets are: a table, and the sandbox they are named after there
/// (`allow4_<id>` in the shared table), or none (a host-mode run's own table: `allow4`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SetsAt {
    pub table: String,
    pub owner: Option<SandboxId>,
}

impl SetsAt {
    /// A sandbox's sets, in the shared table.
    pub fn sandbox(id: &SandboxId) -> Self {
        SetsAt {
            table: SHARED_TABLE.to_owned(),
            owner: Some(id.clone()),
        }
    }

    /// The sets of a table of their own (`allow4`, ...).
    pub fn table(table: impl Into<String>) -> Self {
        SetsAt {
            table: table.into(),
            owner: None,
        }
    }

    /// The name of set (or counter) `base` there.
    pub fn name(&self, base: &str) -> String {
        match &self.owner {
            Some(id) => id.object(base),
            None => base.to_owned(),
        }
    }
}

impl std::fmt::Display for SetsAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.owner {
            Some(id) => write!(f, "table {} (sandbox {id})", self.table),
            None => write!(f, "table {}", self.table),
        }
    }
}

/// One element with its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element {
    pub key: ElementKey,
    pub timeout: Duration,
}

/// Adds elements to a sandbox's sets. The real one speaks netlink; tests use a recorder.
pub trait SetWriter: Send + Sync + std::fmt::Debug {
    /// Adds every element to its set at `at`, all or none, and returns once the kernel
    /// acknowledged them. An error means nothing may be released to the sandbox.
    fn add(&self, at: &SetsAt, elements: &[Element]) -> Result<()>;

    /// Removes every key from its set at `at` and returns once the kernel acknowledged
    /// it. A key that is not in its set (never added, or expired meanwhile) is no error.
    fn remove(&self, at: &SetsAt, keys: &[ElementKey]) -> Result<()> {
        let _ = (at, keys);
        Err(Error::Other(
            "removing set elements is not supported".to_owned(),
        ))
    }
}

/// The netlink implementation: one socket for the whole process (every sandbox).
#[derive(Debug)]
pub struct NetlinkSetWriter {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// A protocol's IANA number, as nft and conntrack store it.
pub(crate) trait ProtocolNumber {
    fn number(&self) -> u8;
}
impl ProtocolNumber for Protocol {
    fn number(&self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl NetlinkSetWriter {
    /// Opens the socket in the calling thread's network namespace.
    pub fn open() -> Result<Self> {
        let what = "open netlink socket for nftables set elements";
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| Error::io(what, e))?;
        socket.bind_auto().map_err(|e| Error::io(what, e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| Error::io(what, e))?;
        socket.set_ext_ack(true).ok();
        set_recv_timeout(&socket, ACK_TIMEOUT).map_err(|e| Error::io(what, e))?;
        Ok(NetlinkSetWriter {
            inner: Mutex::new(Inner {
                socket,
                seq: 1,
                // Filled by `recv` from the start: only the pages replies reach are touched.
                buf: Vec::with_capacity(65536),
            }),
        })
    }
}

/// Bounds how long `recv` on a netlink socket blocks.
pub(crate) fn set_recv_timeout(socket: &Socket, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the fd is a valid open socket owned by `socket`, and `tv` is a properly
    // initialised timeval whose size we pass.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn proto_family(family: Family) -> NetfilterProtoFamily {
    match family {
        Family::Inet => NetfilterProtoFamily::Inet,
        Family::Netdev => NetfilterProtoFamily::NetDev,
    }
}

fn control(msg: ControlMessage, seq: u32) -> NetlinkMessage<NetfilterMessage> {
    let mut m = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        msg,
    ));
    m.header.flags = NLM_F_REQUEST;
    m.header.sequence_number = seq;
    m
}

/// One batch adding `elements`: one NEWSETELEM per set touched, each acknowledged.
fn encode_batch(at: &SetsAt, elements: &[Element]) -> Vec<NetlinkMessage<NetfilterMessage>> {
    let mut by_set: Vec<(&'static str, Vec<ListAttribute<SetElementAttribute>>)> = Vec::new();
    for e in elements {
        let set = e.key.set_name();
        let attrs = vec![
            SetElementAttribute::Key(DataAttribute::Value(e.key.key_bytes())),
            // The kernel takes the timeout in milliseconds; nft sets refuse a zero timeout.
            SetElementAttribute::Timeout(
                e.timeout.as_millis().clamp(1000, u128::from(u64::MAX)) as u64
            ),
        ];
        match by_set.iter_mut().find(|(s, _)| *s == set) {
            Some((_, list)) => list.push(ListAttribute::Element(attrs)),
            None => by_set.push((set, vec![ListAttribute::Element(attrs)])),
        }
    }
    let mut msgs = vec![control(ControlMessage::BatchBegin, 0)];
    for (set, list) in by_set {
        let mut m = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            NfTablesMessage::NewSetElement(SetElementMessage {
                attributes: vec![
                    SetElementList::Table(at.table.clone()),
                    SetElementList::Set(at.name(set)),
                    SetElementList::Elements(list),
                ],
            }),
        ));
        m.header.flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK;
        msgs.push(m);
    }
    msgs.push(control(ControlMessage::BatchEnd, 0));
    msgs
}

/// One batch removing `keys`: one DELSETELEM per key, each acknowledged, so that the kernel
/// names exactly the keys that are missing (see `NetlinkSetWriter::remove`).
fn encode_delete_batch(at: &SetsAt, keys: &[ElementKey]) -> Vec<NetlinkMessage<NetfilterMessage>> {
    let mut msgs = Vec::with_capacity(keys.len() + 2);
    msgs.push(control(ControlMessage::BatchBegin, 0));
    for key in keys {
        let mut m = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            NfTablesMessage::DeleteSetElement(SetElementMessage {
                attributes: vec![
                    SetElementList::Table(at.table.clone()),
                    SetElementList::Set(at.name(key.set_name())),
                    SetElementList::Elements(vec![ListAttribute::Element(vec![
                        SetElementAttribute::Key(DataAttribute::Value(key.key_bytes())),
                    ])]),
                ],
            }),
        ));
        m.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        msgs.push(m);
    }
    msgs.push(control(ControlMessage::BatchEnd, 0));
    msgs
}

/// An element key of the shared table as the kernel stores it: an interface name takes
/// IFNAMSIZ (16) bytes, NUL-padded; addresses their 4 or 16.
fn shared_key_bytes(key: &[KeyPart]) -> Vec<u8> {
    let mut k = Vec::new();
    for part in key {
        match part {
            KeyPart::Ifname(n) => {
                let mut b = n.as_bytes().to_vec();
                b.resize(16, 0);
                k.extend_from_slice(&b);
            }
            KeyPart::Addr(IpAddr::V4(a)) => k.extend_from_slice(&a.octets()),
            KeyPart::Addr(IpAddr::V6(a)) => k.extend_from_slice(&a.octets()),
        }
    }
    k
}

/// The messages removing what a sandbox owns in the shared table, in order (its elements,
/// then its chains' rules, its chains, sets and counters), each asking for an
/// acknowledgement, with what each does; no batch delimiters.
fn encode_objects_removal(o: &SandboxObjects) -> Vec<(NetlinkMessage<NetfilterMessage>, String)> {
    const NFTA_OBJ_TABLE: u16 = 1;
    const NFTA_OBJ_NAME: u16 = 2;
    const NFTA_OBJ_TYPE: u16 = 3;
    const NFT_OBJECT_COUNTER: u32 = 1;
    let t = || SHARED_TABLE.to_owned();
    let msg = |inner: NfTablesMessage| {
        let mut m = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            inner,
        ));
        m.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        m
    };
    let mut out = Vec::new();
    for e in &o.elements {
        out.push((
            msg(NfTablesMessage::DeleteSetElement(SetElementMessage {
                attributes: vec![
                    SetElementList::Table(t()),
                    SetElementList::Set(e.set.to_owned()),
                    SetElementList::Elements(vec![ListAttribute::Element(vec![
                        SetElementAttribute::Key(DataAttribute::Value(shared_key_bytes(&e.key))),
                    ])]),
                ],
            })),
            format!("delete its element of {}", e.set),
        ));
    }
    // A rule deletion naming no rule flushes the chain.
    for c in &o.chains {
        out.push((
            msg(NfTablesMessage::DeleteRule(RuleMessage {
                attributes: vec![RuleAttribute::Table(t()), RuleAttribute::Chain(c.clone())],
            })),
            format!("flush chain {c}"),
        ));
    }
    for c in &o.chains {
        out.push((
            msg(NfTablesMessage::DeleteChain(ChainMessage {
                attributes: vec![ChainAttribute::Table(t()), ChainAttribute::Name(c.clone())],
            })),
            format!("delete chain {c}"),
        ));
    }
    for set in &o.sets {
        out.push((
            msg(NfTablesMessage::DeleteSet(SetMessage {
                attributes: vec![SetAttribute::Table(t()), SetAttribute::Name(set.clone())],
            })),
            format!("delete set {set}"),
        ));
    }
    let cstr = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    };
    for c in &o.counters {
        out.push((
            msg(NfTablesMessage::DeleteObject(vec![
                DefaultNla::new(NFTA_OBJ_TABLE, cstr(SHARED_TABLE)),
                DefaultNla::new(NFTA_OBJ_NAME, cstr(c)),
                DefaultNla::new(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER.to_be_bytes().to_vec()),
            ])),
            format!("delete counter {c}"),
        ));
    }
    out
}

impl NetlinkSetWriter {
    /// Removes what a sandbox owns in the shared table, in one transaction: all of it, or
    /// (an error) nothing. A sandbox's teardown, which knows what it added.
    pub fn remove_objects(&self, objects: &SandboxObjects) -> Result<()> {
        let mut msgs = vec![control(ControlMessage::BatchBegin, 0)];
        msgs.extend(encode_objects_removal(objects).into_iter().map(|(m, _)| m));
        msgs.push(control(ControlMessage::BatchEnd, 0));
        self.transact(msgs, &|| {
            format!("remove the sandbox's chains, sets and elements from table {SHARED_TABLE}")
        })
        .map(drop)
    }

    /// Removes whatever of `objects` exists, one transaction each: the clean-up of a sandbox
    /// whose run died at any point, or of one whose teardown failed half-way. What is not
    /// there is no error; the first other error is returned after every removal was tried.
    pub fn remove_objects_present(&self, objects: &SandboxObjects) -> Result<usize> {
        let mut removed = 0;
        let mut first_error = None;
        for (m, what) in encode_objects_removal(objects) {
            let msgs = vec![
                control(ControlMessage::BatchBegin, 0),
                m,
                control(ControlMessage::BatchEnd, 0),
            ];
            let what = || format!("{what} in table {SHARED_TABLE}");
            match self.transact(msgs, &what) {
                Ok(_) => removed += 1,
                Err(Error::Kernel { source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    /// Sends `msgs` (sequence numbers assigned here) and waits until every message that asked
    /// for an acknowledgement got one. Returns the other replies (answers to GET requests).
    fn transact(
        &self,
        msgs: Vec<NetlinkMessage<NetfilterMessage>>,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<NetlinkMessage<NetfilterMessage>>> {
        let (acks, replies) = self.exchange(msgs, what)?;
        match acks.into_iter().flatten().next() {
            Some(source) => Err(Error::Kernel {
                what: what(),
                source,
            }),
            None => Ok(replies),
        }
    }

    /// Sends `msgs` and waits for every acknowledgement. Returns, for each message that asked
    /// for one (in order), the kernel's error if any, and the other replies.
    ///
    /// In an nf_tables batch the kernel keeps going after a failed message, so that every
    /// error is reported, then aborts the whole batch: the other messages may then be
    /// acknowledged without error although nothing of the batch took effect.
    #[allow(clippy::type_complexity)]
    fn exchange(
        &self,
        mut msgs: Vec<NetlinkMessage<NetfilterMessage>>,
        what: &dyn Fn() -> String,
    ) -> Result<(
        Vec<Option<std::io::Error>>,
        Vec<NetlinkMessage<NetfilterMessage>>,
    )> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| Error::Other(format!("{}: netlink socket poisoned", what())))?;
        let mut awaited = Vec::new();
        let mut bytes = Vec::new();
        for m in &mut msgs {
            let seq = inner.seq;
            inner.seq = inner.seq.wrapping_add(1);
            m.header.sequence_number = seq;
            if m.header.flags & NLM_F_ACK != 0 {
                awaited.push(seq);
            }
            m.finalize();
            let start = bytes.len();
            bytes.resize(start + m.buffer_len(), 0);
            m.serialize(&mut bytes[start..]);
        }
        inner
            .socket
            .send(&bytes, 0)
            .map_err(|e| Error::io(what(), e))?;
        let Inner { socket, buf, .. } = &mut *inner;
        let mut acks: Vec<Option<std::io::Error>> = awaited.iter().map(|_| None).collect();
        let mut answered = vec![false; awaited.len()];
        let mut pending = awaited.len();
        let mut replies = Vec::new();
        while pending > 0 {
            buf.clear();
            // What was received is `buf` (never more than was written into it).
            match socket.recv(buf, 0) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Error::Timeout { what: what() });
                }
                Err(e) => return Err(Error::io(what(), e)),
            };
            let mut off = 0;
            while off < buf.len() {
                let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[off..])
                    .map_err(|e| Error::netlink(what(), e))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                let seq = msg.header.sequence_number;
                match msg.payload {
                    NetlinkPayload::Error(err) => {
                        // A stray duplicate is never counted twice.
                        if let Some(i) = awaited.iter().position(|s| *s == seq)
                            && !answered[i]
                        {
                            answered[i] = true;
                            pending -= 1;
                            if err.code.is_some() {
                                acks[i] = Some(err.to_io());
                            }
                        }
                    }
                    _ => replies.push(msg),
                }
            }
        }
        Ok((acks, replies))
    }

    /// Deletes an `inet` table in one acknowledged batch; a table already gone is not an error.
    /// (Teardown path: no `nft` process, so no dependency on it at exit.)
    pub fn delete_table(&self, table: &str) -> Result<()> {
        self.delete_family_table(Family::Inet, table)
    }

    /// Deletes a table of `family` in one acknowledged batch; a table already gone is not an
    /// error.
    pub fn delete_family_table(&self, family: Family, table: &str) -> Result<()> {
        let mut del = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(proto_family(family), 0, 0),
            NfTablesMessage::DeleteTable(TableMessage {
                attributes: vec![TableAttribute::Name(table.to_owned())],
            }),
        ));
        del.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let msgs = vec![
            control(ControlMessage::BatchBegin, 0),
            del,
            control(ControlMessage::BatchEnd, 0),
        ];
        match self.transact(msgs, &|| format!("delete nft table {family} {table}")) {
            Err(Error::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            other => other.map(drop),
        }
    }

    /// Deletes the shared table if no sandbox has anything left in it, whoever's state
    /// directory it was made from; whether it did. One transaction: the table's own base
    /// chains (flushed first) and maps, then the table itself with NLM_F_NONREC, which the
    /// kernel refuses (EBUSY) while the table holds anything else: a sandbox's chain, set or
    /// counter. Refused, the whole transaction is undone. A table that is not there is no
    /// error.
    pub fn delete_shared_table_if_unused(&self) -> Result<bool> {
        const NLM_F_NONREC: u16 = 0x100;
        let (chains, sets) = skeleton_objects();
        // The table's own objects go the way a sandbox's do (it has no elements or counters).
        let own = SandboxObjects {
            chains: chains.iter().map(|c| (*c).to_owned()).collect(),
            sets: sets.iter().map(|s| (*s).to_owned()).collect(),
            ..SandboxObjects::default()
        };
        let mut msgs = vec![control(ControlMessage::BatchBegin, 0)];
        msgs.extend(encode_objects_removal(&own).into_iter().map(|(m, _)| m));
        let mut del = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            NfTablesMessage::DeleteTable(TableMessage {
                attributes: vec![TableAttribute::Name(SHARED_TABLE.to_owned())],
            }),
        ));
        del.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_NONREC;
        msgs.push(del);
        msgs.push(control(ControlMessage::BatchEnd, 0));
        match self.transact(msgs, &|| {
            format!("delete nft table inet {SHARED_TABLE} if no sandbox is left in it")
        }) {
            Ok(_) => Ok(true),
            Err(Error::Kernel { source, .. })
                if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::EBUSY)) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether `inet` table `table` exists.
    pub fn table_exists(&self, table: &str) -> Result<bool> {
        let mut get = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
            NfTablesMessage::GetTable(TableMessage {
                attributes: vec![TableAttribute::Name(table.to_owned())],
            }),
        ));
        get.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        match self.transact(vec![get], &|| format!("look for nft table inet {table}")) {
            Ok(_) => Ok(true),
            Err(Error::Kernel { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Packets counted by the named counter object `counter` of `inet` table `table`.
    pub fn counter_packets(&self, table: &str, counter: &str) -> Result<u64> {
        self.family_counter_packets(Family::Inet, table, counter)
    }

    /// Packets counted by the named counter object `counter` of table `table` of `family`.
    pub fn family_counter_packets(
        &self,
        family: Family,
        table: &str,
        counter: &str,
    ) -> Result<u64> {
        const NFTA_OBJ_TABLE: u16 = 1;
        const NFTA_OBJ_NAME: u16 = 2;
        const NFTA_OBJ_TYPE: u16 = 3;
        const NFTA_OBJ_DATA: u16 = 4;
        const NFT_OBJECT_COUNTER: u32 = 1;
        const NFTA_COUNTER_PACKETS: u16 = 2;
        let cstr = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            v.push(0);
            v
        };
        let mut get = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(proto_family(family), 0, 0),
            NfTablesMessage::GetObject(vec![
                DefaultNla::new(NFTA_OBJ_TABLE, cstr(table)),
                DefaultNla::new(NFTA_OBJ_NAME, cstr(counter)),
                DefaultNla::new(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER.to_be_bytes().to_vec()),
            ]),
        ));
        get.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let what = || format!("read counter {counter} of table {family} {table}");
        for reply in self.transact(vec![get], &what)? {
            let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewObject(nlas)),
                ..
            }) = reply.payload
            else {
                continue;
            };
            for nla in nlas.iter().filter(|n| n.kind() & 0x3fff == NFTA_OBJ_DATA) {
                let mut data = vec![0u8; nla.value_len()];
                nla.emit_value(&mut data);
                for inner in NlasIterator::new(&data[..]).flatten() {
                    if inner.kind() & 0x3fff == NFTA_COUNTER_PACKETS
                        && let Ok(b) = <[u8; 8]>::try_from(inner.value())
                    {
                        return Ok(u64::from_be_bytes(b));
                    }
                }
            }
        }
        Err(Error::Other(format!(
            "{}: no packet count in the kernel's answer",
            what()
        )))
    }
}

impl SetWriter for NetlinkSetWriter {
    fn add(&self, at: &SetsAt, elements: &[Element]) -> Result<()> {
        if elements.is_empty() {
            return Ok(());
        }
        self.transact(encode_batch(at, elements), &|| {
            format!("add {} elements to the sets of {at}", elements.len())
        })
        .map(drop)
    }

    /// One transaction when every key is present. An element that expired (or was never
    /// added) makes the kernel answer ENOENT for its message and abort the whole batch (the
    /// kernel names every missing key at once); the batch is then sent again without them.
    /// Measured for 100 keys (kernel 6.18, `tests/revoke.rs`): all present 0.4 ms; one
    /// missing 6 to 16 ms, nearly all of it the kernel's abort of the first batch, which a
    /// batch per key does not avoid (each missing key then costs an abort of its own).
    fn remove(&self, at: &SetsAt, keys: &[ElementKey]) -> Result<()> {
        let mut keys: Vec<ElementKey> = keys.to_vec();
        // Each round drops at least one key, or ends.
        while !keys.is_empty() {
            let what = || format!("remove {} elements from the sets of {at}", keys.len());
            let (acks, _) = self.exchange(encode_delete_batch(at, &keys), &what)?;
            let mut missing = vec![false; keys.len()];
            let mut failed = false;
            for (i, ack) in acks.into_iter().enumerate() {
                match ack {
                    None => {}
                    Some(e) if e.raw_os_error() == Some(libc::ENOENT) && i < keys.len() => {
                        missing[i] = true;
                    }
                    Some(source) => {
                        return Err(Error::Kernel {
                            what: what(),
                            source,
                        });
                    }
                }
                failed |= missing.get(i).copied().unwrap_or(false);
            }
            if !failed {
                return Ok(());
            }
            let mut i = 0;
            keys.retain(|_| {
                let keep = !missing[i];
                i += 1;
                keep
            });
        }
        Ok(())
    }
}

/// The addresses an element key opens, for reporting.
pub fn key_addr(key: &ElementKey) -> IpAddr {
    match key {
        ElementKey::Addr(a) | ElementKey::AddrPort(a, ..) => *a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_groups_elements_per_set_and_awaits_one_ack_per_set() {
        let els = [
            Element {
                key: ElementKey::Addr("198.51.100.1".parse().unwrap()),
                timeout: Duration::from_secs(60),
            },
            Element {
                key: ElementKey::Addr("198.51.100.2".parse().unwrap()),
                timeout: Duration::from_secs(60),
            },
            Element {
                key: ElementKey::Addr("2001:db8::1".parse().unwrap()),
                timeout: Duration::from_secs(60),
            },
            Element {
                key: ElementKey::AddrPort("198.51.100.3".parse().unwrap(), Protocol::Tcp, 443),
                timeout: Duration::from_secs(60),
            },
        ];
        let id = SandboxId::parse("0a1b2c3d").unwrap();
        let msgs = encode_batch(&SetsAt::sandbox(&id), &els);
        // BEGIN, allow4, allow6, allow4p, END; every element message asks for an ACK.
        assert_eq!(msgs.len(), 5);
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewSetElement(m)),
            ..
        }) = &msgs[1].payload
        else {
            panic!("not a NEWSETELEM: {:?}", msgs[1]);
        };
        assert!(
            m.attributes
                .contains(&SetElementList::Table(SHARED_TABLE.into()))
        );
        assert!(
            m.attributes
                .contains(&SetElementList::Set("allow4_0a1b2c3d".into()))
        );
        assert_eq!(
            msgs.iter()
                .filter(|m| m.header.flags & NLM_F_ACK != 0)
                .count(),
            3
        );
    }

    #[test]
    fn shared_keys_pad_interface_names_to_ifnamsiz() {
        let k = shared_key_bytes(&[
            KeyPart::Addr("203.0.113.2".parse().unwrap()),
            KeyPart::Ifname("pc-0a1b2c3d-h".into()),
        ]);
        assert_eq!(k.len(), 20);
        assert_eq!(&k[..4], &[203, 0, 113, 2]);
        assert_eq!(&k[4..17], b"pc-0a1b2c3d-h");
        assert_eq!(&k[17..], &[0, 0, 0]);
    }

    #[test]
    fn port_keys_are_padded_fields() {
        let k = ElementKey::AddrPort("198.51.100.3".parse().unwrap(), Protocol::Udp, 0x1234);
        assert_eq!(
            k.key_bytes(),
            vec![198, 51, 100, 3, 17, 0, 0, 0, 0x12, 0x34, 0, 0]
        );
    }
}
