//! Tuning profiles (`tuning/profiles/*.conf`): which cores run shards, whether to pin them,
//! UDP buffer sizes, and host settings that `tuning/apply.sh` applies or checks.
//! The built-in profiles are compiled in, so `--profile dev` works from any directory.

use std::path::Path;

/// Profiles shipped in `tuning/profiles/`.
const BUILT_IN: &[(&str, &str)] = &[
    ("dev", include_str!("../tuning/profiles/dev.conf")),
    (
        "nvme-dedicated",
        include_str!("../tuning/profiles/nvme-dedicated.conf"),
    ),
];

/// What the broker takes from a profile (host settings are `apply.sh`'s business).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TuningProfile {
    pub name: String,
    /// Cores that run shards; `None`: every online core.
    pub shard_cores: Option<Vec<usize>>,
    pub pin: bool,
    pub udp_recv_buffer: Option<usize>,
    pub udp_send_buffer: Option<usize>,
}

impl TuningProfile {
    /// A built-in profile by name, or a profile file by path.
    pub fn load(name_or_path: &str) -> Result<TuningProfile, String> {
        if let Some((n, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(n, text);
        }
        let p = Path::new(name_or_path);
        if p.exists() {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{name_or_path}: {e}"))?;
            return Self::parse(name_or_path, &text);
        }
        let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
        Err(format!(
            "unknown tuning profile {name_or_path:?}: built-in profiles are {}, or give a path",
            names.join(", ")
        ))
    }

    pub fn parse(name: &str, text: &str) -> Result<TuningProfile, String> {
        let mut p = TuningProfile {
            name: name.into(),
            shard_cores: None,
            pin: true,
            udp_recv_buffer: None,
            udp_send_buffer: None,
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| format!("{name}:{}: expected key = value", i + 1))?;
            let bad = |why: &str| format!("{name}:{}: {k} = {v:?}: {why}", i + 1);
            match k {
                "shard_cores" if v.is_empty() => p.shard_cores = None,
                "shard_cores" => {
                    p.shard_cores = Some(crate::shard::parse_cores(v).map_err(|e| bad(&e))?)
                }
                "pin" => p.pin = v.parse().map_err(|_| bad("expected true or false"))?,
                "udp_recv_buffer" => {
                    p.udp_recv_buffer = Some(v.parse().map_err(|_| bad("expected bytes"))?)
                }
                "udp_send_buffer" => {
                    p.udp_send_buffer = Some(v.parse().map_err(|_| bad("expected bytes"))?)
                }
                // Host settings, applied by tuning/apply.sh.
                "os_cores" | "irq_cores" => {}
                k if k.starts_with("sysctl.") || k.starts_with("limit.") => {}
                _ => return Err(format!("{name}:{}: unknown key {k:?}", i + 1)),
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_profiles_parse() {
        let dev = TuningProfile::load("dev").unwrap();
        assert_eq!(dev.shard_cores, None);
        assert!(!dev.pin);
        assert_eq!(dev.udp_recv_buffer, Some(4 << 20));
        let nvme = TuningProfile::load("nvme-dedicated").unwrap();
        assert_eq!(nvme.shard_cores.as_ref().map(Vec::len), Some(14));
        assert!(nvme.pin);
    }

    #[test]
    fn unknown_profiles_and_keys_are_errors() {
        assert!(TuningProfile::load("nope").unwrap_err().contains("dev"));
        assert!(TuningProfile::parse("x", "speed = 11\n")
            .unwrap_err()
            .contains("x:1"));
    }
}
