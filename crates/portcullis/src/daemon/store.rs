//! The daemon's durable state: one SQLite database (`<state_dir>/portcullis.db`) holding
//! what must survive a restart or a reboot: the sandboxes with their policies, networks and
//! published ports, the keeper that holds each one's namespaces, the set elements the relay
//! opened (snapshots, to re-populate the sets), the networks, and the audit log. The trust
//! store keeps its own tables in the same file.
//!
//! Every call is short and synchronous; callers on the async runtime use `spawn_blocking`
//! for anything but the smallest reads.

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context as _, anyhow};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

/// Where a sandbox's policy came from, kept as given so `show` returns it unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct PolicySource {
    /// A TOML policy document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toml: Option<String>,
    /// Allow patterns, as `run --allow` takes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

/// What an attached sandbox was made from (`sandbox attach`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct AttachSource {
    /// The namespace file given (`--netns`), or `/proc/PID/ns/net` for `--pid`.
    pub netns: String,
    /// Its inode when attached: a namespace file that now names another namespace is not
    /// the one the policy was put on.
    pub inode: u64,
    /// `--pid`: the process and its start time (clock ticks after boot); when it ends, the
    /// namespace is taken for gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<(u32, u64)>,
}

/// One sandbox as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRow {
    pub name: String,
    /// Its kernel objects' id (`pc-<id>` tables and links).
    pub id: String,
    pub policy: PolicySource,
    pub network: Option<String>,
    pub publish: Vec<String>,
    pub attach: Option<AttachSource>,
    /// The keeper process holding its namespaces: pid and start time (clock ticks after
    /// boot, from /proc/PID/stat), so a reused pid is never taken for it.
    pub keeper: Option<(u32, u64)>,
    /// The relay's ports (udp4, tcp4, udp6, tcp6), rebound after a restart.
    pub relay_ports: Option<[u16; 4]>,
    pub nflog_group: Option<u16>,
    /// Unix seconds.
    pub created_at: i64,
    /// A learning sandbox: open egress, everything recorded (`learning.rs`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learn: bool,
}

/// One audit record: a mutating API call.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub id: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub identity: String,
    pub role: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    name TEXT PRIMARY KEY,
    row TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS elements (
    sandbox TEXT PRIMARY KEY,
    saved_at_ms INTEGER NOT NULL,
    elements TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS networks (
    name TEXT PRIMARY KEY,
    subnet4 TEXT NOT NULL,
    subnet6 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    identity TEXT NOT NULL,
    role TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL
);
";

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let conn =
            Connection::open(path).with_context(|| format!("open database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("create tables in {}", path.display()))?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> anyhow::Result<T> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| anyhow!("database handle poisoned"))?;
        f(&conn).map_err(|e| anyhow!("database: {e}"))
    }

    pub fn put_sandbox(&self, row: &SandboxRow) -> anyhow::Result<()> {
        let text = serde_json::to_string(row)?;
        self.with(|c| {
            c.execute(
                "INSERT INTO sandboxes (name, row) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET row = excluded.row",
                params![row.name, text],
            )
            .map(drop)
        })
    }

    pub fn delete_sandbox(&self, name: &str) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM sandboxes WHERE name = ?1", params![name])?;
            c.execute("DELETE FROM elements WHERE sandbox = ?1", params![name])
                .map(drop)
        })
    }

    pub fn sandboxes(&self) -> anyhow::Result<Vec<SandboxRow>> {
        let texts: Vec<(String, String)> = self.with(|c| {
            let mut st = c.prepare("SELECT name, row FROM sandboxes ORDER BY name")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
        })?;
        texts
            .into_iter()
            .map(|(name, t)| {
                serde_json::from_str(&t)
                    .with_context(|| format!("stored sandbox {name} is damaged"))
            })
            .collect()
    }

    /// Replaces the stored snapshot of a sandbox's set elements (JSON, as the relay gives it).
    pub fn save_elements(&self, sandbox: &str, elements_json: &str) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO elements (sandbox, saved_at_ms, elements) VALUES (?1, ?2, ?3)
                 ON CONFLICT(sandbox) DO UPDATE SET saved_at_ms = excluded.saved_at_ms,
                 elements = excluded.elements",
                params![sandbox, now_ms(), elements_json],
            )
            .map(drop)
        })
    }

    /// The last snapshot of a sandbox's elements and when it was taken (unix ms).
    pub fn elements(&self, sandbox: &str) -> anyhow::Result<Option<(i64, String)>> {
        self.with(|c| {
            c.query_row(
                "SELECT saved_at_ms, elements FROM elements WHERE sandbox = ?1",
                params![sandbox],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    pub fn put_network(&self, name: &str, subnet4: &str, subnet6: &str) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO networks (name, subnet4, subnet6) VALUES (?1, ?2, ?3)",
                params![name, subnet4, subnet6],
            )
            .map(drop)
        })
    }

    pub fn delete_network(&self, name: &str) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM networks WHERE name = ?1", params![name])
                .map(drop)
        })
    }

    pub fn networks(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, subnet4, subnet6 FROM networks ORDER BY name")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
    }

    pub fn audit(
        &self,
        identity: &str,
        role: &str,
        method: &str,
        path: &str,
        status: u16,
    ) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO audit (at_ms, identity, role, method, path, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![now_ms(), identity, role, method, path, status],
            )
            .map(drop)
        })
    }

    /// The newest `limit` audit records, oldest first.
    pub fn audit_log(&self, limit: u32) -> anyhow::Result<Vec<AuditRecord>> {
        let mut v: Vec<AuditRecord> = self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, at_ms, identity, role, method, path, status FROM audit
                 ORDER BY id DESC LIMIT ?1",
            )?;
            st.query_map(params![limit], |r| {
                Ok(AuditRecord {
                    id: r.get(0)?,
                    at_ms: r.get(1)?,
                    identity: r.get(2)?,
                    role: r.get(3)?,
                    method: r.get(4)?,
                    path: r.get(5)?,
                    status: r.get(6)?,
                })
            })?
            .collect()
        })?;
        v.reverse();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        let row = SandboxRow {
            name: "web".into(),
            id: "0123456789ab".into(),
            policy: PolicySource {
                toml: None,
                allow: vec!["*.example.com".into()],
            },
            network: None,
            publish: vec!["8080:80".into()],
            attach: None,
            keeper: Some((42, 7)),
            relay_ports: Some([1, 2, 3, 4]),
            nflog_group: Some(0x7001),
            created_at: 1,
            learn: false,
        };
        {
            let s = Store::open(&path).unwrap();
            s.put_sandbox(&row).unwrap();
            s.save_elements("web", "[]").unwrap();
            s.audit("local", "admin", "POST", "/1.0/sandboxes", 201)
                .unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.sandboxes().unwrap(), vec![row]);
        assert_eq!(s.elements("web").unwrap().unwrap().1, "[]");
        assert_eq!(s.audit_log(10).unwrap()[0].status, 201);
        s.delete_sandbox("web").unwrap();
        assert!(s.sandboxes().unwrap().is_empty());
        assert!(s.elements("web").unwrap().is_none());
    }
}
