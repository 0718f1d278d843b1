//! The name server's KV config (RocketMQ's KVConfigManager): namespaced settings that admin
//! tools put and clients read. The only state a name server keeps of its own; persisted in
//! `<data-dir>/kv.conf` when the name server has a data directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Longest namespace or key.
pub const MAX_KV_KEY_LEN: usize = 255;
/// Longest value.
pub const MAX_KV_VALUE_LEN: usize = 16 * 1024;
/// Entries kept, all namespaces together.
pub const MAX_KV_ENTRIES: usize = 10_000;
const KV_FILE: &str = "kv.conf";
const KV_HEADER: &str = "# orbitmq name server KV config: namespace<TAB>key<TAB>value, escaped";

#[derive(Debug, Error)]
pub enum KvError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {why}")]
    Io { path: String, why: String },
}

#[derive(Debug, Default)]
pub struct KvConfig {
    table: BTreeMap<(String, String), String>,
    path: Option<PathBuf>,
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some(o) => out.push(o),
            None => out.push('\\'),
        }
    }
    out
}

fn check_key(what: &str, k: &str) -> Result<(), KvError> {
    if k.is_empty() || k.len() > MAX_KV_KEY_LEN {
        return Err(KvError::Invalid(format!(
            "{what} must be 1..={MAX_KV_KEY_LEN} bytes"
        )));
    }
    Ok(())
}

impl KvConfig {
    /// An in-memory table (no data directory).
    pub fn in_memory() -> KvConfig {
        KvConfig::default()
    }

    /// Loads `<dir>/kv.conf` (missing: empty); puts are written back there.
    pub fn load(dir: &Path) -> Result<KvConfig, KvError> {
        let path = dir.join(KV_FILE);
        let mut kv = KvConfig {
            table: BTreeMap::new(),
            path: Some(path.clone()),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(kv),
            Err(e) => {
                return Err(KvError::Io {
                    path: path.display().to_string(),
                    why: e.to_string(),
                })
            }
        };
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parts: Vec<&str> = line.splitn(3, '\t').collect();
            if parts.len() != 3 {
                return Err(KvError::Io {
                    path: path.display().to_string(),
                    why: format!("line {}: expected namespace, key and value", i + 1),
                });
            }
            kv.table
                .insert((unescape(parts[0]), unescape(parts[1])), unescape(parts[2]));
        }
        Ok(kv)
    }

    pub fn get(&self, namespace: &str, key: &str) -> Option<&str> {
        self.table
            .get(&(namespace.to_owned(), key.to_owned()))
            .map(String::as_str)
    }

    pub fn put(&mut self, namespace: &str, key: &str, value: &str) -> Result<(), KvError> {
        check_key("namespace", namespace)?;
        check_key("key", key)?;
        if value.len() > MAX_KV_VALUE_LEN {
            return Err(KvError::Invalid(format!(
                "value of {} bytes is over the limit of {MAX_KV_VALUE_LEN}",
                value.len()
            )));
        }
        let k = (namespace.to_owned(), key.to_owned());
        if !self.table.contains_key(&k) && self.table.len() >= MAX_KV_ENTRIES {
            return Err(KvError::Invalid(format!(
                "the KV config holds {MAX_KV_ENTRIES} entries already"
            )));
        }
        self.table.insert(k, value.to_owned());
        self.persist()
    }

    /// Removes a key; returns whether it was there.
    pub fn delete(&mut self, namespace: &str, key: &str) -> Result<bool, KvError> {
        let had = self
            .table
            .remove(&(namespace.to_owned(), key.to_owned()))
            .is_some();
        if had {
            self.persist()?;
        }
        Ok(had)
    }

    fn persist(&self) -> Result<(), KvError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut s = format!("{KV_HEADER}\n");
        for ((ns, k), v) in &self.table {
            s.push_str(&format!("{}\t{}\t{}\n", escape(ns), escape(k), escape(v)));
        }
        crate::log::fsutil::write_atomically(path, s.as_bytes()).map_err(|e| KvError::Io {
            path: path.display().to_string(),
            why: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_delete_and_persist_with_escapes() {
        let d = tempfile::tempdir().unwrap();
        let mut kv = KvConfig::load(d.path()).unwrap();
        kv.put("ORDER_TOPIC_CONFIG", "T", "a\tb\nc\\d").unwrap();
        kv.put("ns", "k", "v").unwrap();
        assert!(kv.put("", "k", "v").is_err());
        assert!(kv
            .put("ns", "k", &"x".repeat(MAX_KV_VALUE_LEN + 1))
            .is_err());
        let kv2 = KvConfig::load(d.path()).unwrap();
        assert_eq!(kv2.get("ORDER_TOPIC_CONFIG", "T"), Some("a\tb\nc\\d"));
        assert_eq!(kv2.get("ns", "k"), Some("v"));
        assert!(kv.delete("ns", "k").unwrap());
        assert!(!kv.delete("ns", "k").unwrap());
        assert_eq!(KvConfig::load(d.path()).unwrap().get("ns", "k"), None);
        let mut mem = KvConfig::in_memory();
        mem.put("a", "b", "c").unwrap();
        assert_eq!(mem.get("a", "b"), Some("c"));
    }
}
