//! The client's list of remote servers, each pinned to its certificate's fingerprint, in a
//! TOML file (`~/.config/portcullis/remotes.toml` by default). Every change rewrites the whole
//! file atomically (a temporary file renamed over it), so a crash never leaves half a file.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::fingerprint::parse_fingerprint;

/// A remote server as the client knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    pub name: String,
    /// `https://host:port`.
    pub url: String,
    /// The pinned SHA-256 fingerprint of the server's certificate.
    pub fingerprint: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    #[serde(default)]
    remotes: BTreeMap<String, Stored>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    url: String,
    fingerprint: String,
}

/// The remotes file, loaded.
#[derive(Debug)]
pub struct Remotes {
    path: PathBuf,
    remotes: BTreeMap<String, Stored>,
}

impl Remotes {
    /// `$XDG_CONFIG_HOME/portcullis/remotes.toml`, else `$HOME/.config/portcullis/remotes.toml`.
    pub fn default_path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".config"))
            })?;
        Some(base.join("portcullis").join("remotes.toml"))
    }

    /// Reads the file; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Remotes, Error> {
        let bad = |reason: String| Error::RemotesFile {
            path: path.to_owned(),
            reason,
        };
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(Error::Io {
                    op: "read",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let file: File = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        for (name, r) in &file.remotes {
            parse_fingerprint(&r.fingerprint).map_err(|e| bad(format!("remote {name:?}: {e}")))?;
        }
        Ok(Remotes {
            path: path.to_owned(),
            remotes: file.remotes,
        })
    }

    /// Adds a remote and saves the file. Refuses a name that exists; the URL must be
    /// `https://host:port` (or `https://host`); the fingerprint is stored canonical.
    pub fn add(&mut self, name: &str, url: &str, fingerprint: &str) -> Result<Remote, Error> {
        check_remote_name(name)?;
        check_url(url)?;
        let fingerprint = parse_fingerprint(fingerprint)?;
        if self.remotes.contains_key(name) {
            return Err(Error::DuplicateRemote(name.to_owned()));
        }
        let stored = Stored {
            url: url.trim_end_matches('/').to_owned(),
            fingerprint,
        };
        let mut next = self.remotes.clone();
        next.insert(name.to_owned(), stored.clone());
        self.save(&next)?;
        self.remotes = next;
        Ok(remote(name, &stored))
    }

    /// The remote with this name.
    pub fn get(&self, name: &str) -> Option<Remote> {
        self.remotes.get(name).map(|s| remote(name, s))
    }

    /// Removes a remote and saves the file.
    pub fn remove(&mut self, name: &str) -> Result<Remote, Error> {
        let mut next = self.remotes.clone();
        let stored = next
            .remove(name)
            .ok_or_else(|| Error::UnknownRemote(name.to_owned()))?;
        self.save(&next)?;
        self.remotes = next;
        Ok(remote(name, &stored))
    }

    /// All remotes, by name.
    pub fn list(&self) -> Vec<Remote> {
        self.remotes.iter().map(|(n, s)| remote(n, s)).collect()
    }

    /// The file this list is saved to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn save(&self, remotes: &BTreeMap<String, Stored>) -> Result<(), Error> {
        let ioerr = |op, path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { op, path, source }
        };
        let text = toml::to_string(&File {
            remotes: remotes.clone(),
        })
        .map_err(|e| Error::RemotesFile {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(ioerr("create directory", dir))?;
        }
        let mut tmp_name = self.path.as_os_str().to_owned();
        tmp_name.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)
                .map_err(ioerr("create", &tmp))?;
            f.write_all(text.as_bytes()).map_err(ioerr("write", &tmp))?;
            f.sync_all().map_err(ioerr("sync", &tmp))?;
            fs::rename(&tmp, &self.path).map_err(ioerr("rename into place", &self.path))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }
}

fn remote(name: &str, s: &Stored) -> Remote {
    Remote {
        name: name.to_owned(),
        url: s.url.clone(),
        fingerprint: s.fingerprint.clone(),
    }
}

fn check_remote_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName {
            given: name.to_owned(),
            reason: "a remote name is 1 to 64 ASCII letters, digits, '.', '_' or '-'",
        })
    }
}

fn check_url(url: &str) -> Result<(), Error> {
    let bad = |reason| Error::BadUrl {
        given: url.to_owned(),
        reason,
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("it must start with https://"))?;
    let host_port = rest.trim_end_matches('/');
    if host_port.is_empty() {
        return Err(bad("it has no host"));
    }
    if host_port.contains(['/', '?', '#', '@', ' ']) {
        return Err(bad("only https://host:port is allowed, without a path"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_get_remove_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cfg/remotes.toml");
        let fp = crate::fingerprint(b"server");
        let mut r = Remotes::load(&path).unwrap();
        assert!(r.list().is_empty());
        let added = r
            .add("prod", "https://198.51.100.201:8443/", &fp.to_uppercase())
            .unwrap();
        assert_eq!(added.url, "https://198.51.100.201:8443");
        assert_eq!(added.fingerprint, fp);
        let e = r.add("prod", "https://x:1", &fp).unwrap_err().to_string();
        assert!(e.contains("a remote named \"prod\" already exists"), "{e}");

        let again = Remotes::load(&path).unwrap();
        assert_eq!(again.get("prod"), Some(added.clone()));
        assert_eq!(again.list(), vec![added]);
        assert!(
            !fs::read_dir(dir.path().join("cfg"))
                .unwrap()
                .any(|e| { e.unwrap().file_name().to_string_lossy().contains(".tmp") })
        );

        let mut again = again;
        again.remove("prod").unwrap();
        assert!(
            again
                .remove("prod")
                .unwrap_err()
                .to_string()
                .contains("no remote named")
        );
        assert!(Remotes::load(&path).unwrap().list().is_empty());
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Remotes::load(&dir.path().join("r.toml")).unwrap();
        let fp = crate::fingerprint(b"s");
        assert!(
            r.add("a", "http://h:1", &fp)
                .unwrap_err()
                .to_string()
                .contains("https://")
        );
        assert!(r.add("a b", "https://h:1", &fp).is_err());
        assert!(r.add("a", "https://h:1", "xyz").is_err());
        fs::write(dir.path().join("bad.toml"), "[remotes.x]\nurl = 1\n").unwrap();
        let e = Remotes::load(&dir.path().join("bad.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.toml"), "{e}");
    }
}
