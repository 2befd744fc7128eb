//! lbd's runtime state on disk: the services as last applied (file + CLI changes),
//! health, the hash of the config file they came from. Written after every change,
//! atomically: temp file, fsync, rename over the old one, fsync the directory, so a
//! crash at any point leaves either the old or the new state, never a mix.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::core::HealthRecord;
use crate::model::ServiceDef;

pub const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub format: u32,
    /// `config::content_hash` of the config file the services started from.
    pub config_hash: String,
    pub version: u64,
    pub services: Vec<ServiceDef>,
    #[serde(default)]
    pub health: Vec<HealthRecord>,
    /// Interface -> XDP mode it was attached in ("native" | "generic").
    #[serde(default)]
    pub interfaces: BTreeMap<String, String>,
    /// Cluster: where the services stand in the pair's order (version, origin node).
    #[serde(default)]
    pub cluster_config: Option<(u64, u32)>,
    /// Cluster: the epoch of the last run's datagrams (the next run's must be larger).
    #[serde(default)]
    pub cluster_epoch: Option<u64>,
}

pub fn save(path: &Path, state: &State) -> anyhow::Result<()> {
    let dir = path.parent().context("state file has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let data = serde_json::to_vec_pretty(state).context("encoding state")?;
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&data).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("fsync {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync {}", dir.display()))?;
    Ok(())
}

/// What `load` found.
pub enum Loaded {
    Missing,
    Found(State),
    /// Unreadable or from another format: moved aside to the returned path.
    Corrupt(PathBuf, String),
}

pub fn load(path: &Path) -> Loaded {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return Loaded::Corrupt(path.to_path_buf(), e.to_string()),
    };
    let why = match serde_json::from_slice::<State>(&data) {
        Ok(mut s) if s.format == FORMAT => {
            // A position past the range (saved by an older lbd from a peer announcing
            // it) would freeze replication: forget it, so the node syncs from its peer.
            if s.cluster_config.is_some_and(|(v, _)| v > crate::cluster::config_sync::MAX_CONFIG_VERSION) {
                s.cluster_config = None;
            }
            return Loaded::Found(s);
        }
        Ok(s) => format!("format {} (this lbd reads {FORMAT})", s.format),
        Err(e) => e.to_string(),
    };
    // Keep the bad file for the operator instead of overwriting it.
    let aside = path.with_extension(format!("json.bad-{}", std::process::id()));
    let _ = std::fs::rename(path, &aside);
    Loaded::Corrupt(aside, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-persist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temp() {
        let d = tmpdir("rt");
        let p = d.join("state.json");
        let s = State { format: FORMAT, config_hash: "abc".into(), version: 7, services: vec![], health: vec![], interfaces: BTreeMap::new(), cluster_config: None, cluster_epoch: None };
        save(&p, &s).unwrap();
        let s2 = State { version: 8, ..s.clone() };
        save(&p, &s2).unwrap();
        match load(&p) {
            Loaded::Found(x) => assert_eq!(x, s2),
            _ => panic!("state not found"),
        }
        let names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_config_position_past_the_range_is_forgotten() {
        let d = tmpdir("pos");
        let p = d.join("state.json");
        let s = State {
            format: FORMAT,
            config_hash: "abc".into(),
            version: 7,
            services: vec![],
            health: vec![],
            interfaces: BTreeMap::new(),
            cluster_config: Some((u64::MAX, 2)),
            cluster_epoch: None,
        };
        save(&p, &s).unwrap();
        match load(&p) {
            Loaded::Found(x) => assert_eq!(x.cluster_config, None),
            _ => panic!("state not found"),
        }
        save(&p, &State { cluster_config: Some((9, 2)), ..s }).unwrap();
        assert!(matches!(load(&p), Loaded::Found(x) if x.cluster_config == Some((9, 2))));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A state file from before `flow_table` (issue 15) loads with the default (on);
    /// one saved with a service off keeps it across save and load.
    #[test]
    fn state_without_flow_table_loads_as_on_and_off_round_trips() {
        let d = tmpdir("ft");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("state.json");
        let old = r#"{"format":1,"config_hash":"abc","version":3,"services":[
            {"name":"web","vip":"10.0.0.100:80/tcp","mode":"gue","table_size":251,"unhealthy":"keep",
             "backend":[{"address":"10.0.1.11","weight":1}]}]}"#;
        std::fs::write(&p, old).unwrap();
        let Loaded::Found(mut s) = load(&p) else { panic!("an old state file must load") };
        assert_eq!(s.services[0].flow_table, crate::model::FlowTable::On);
        s.services[0].flow_table = crate::model::FlowTable::Off;
        save(&p, &s).unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().contains(r#""flow_table": "off""#));
        assert!(matches!(load(&p), Loaded::Found(x) if x == s));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_state_is_moved_aside_not_lost() {
        let d = tmpdir("bad");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("state.json");
        std::fs::write(&p, b"{ half a file").unwrap();
        match load(&p) {
            Loaded::Corrupt(aside, why) => {
                assert!(!why.is_empty());
                assert_eq!(std::fs::read(&aside).unwrap(), b"{ half a file");
            }
            _ => panic!("expected Corrupt"),
        }
        assert!(matches!(load(&p), Loaded::Missing));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
