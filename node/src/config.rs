//! Settings: embedded defaults, an optional TOML file, then `--set section.key=value` flags.
//! Unknown keys and bad values are errors that name the key.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    pub c2s: C2s,
    pub registration: Registration,
    pub auth: Auth,
    pub offline: Offline,
    pub roster: Roster,
    pub tls: Tls,
    pub log: Log,
    pub metrics: Metrics,
    pub cluster: Cluster,
    pub actors: Actors,
}

/// Placed actors (ARCHITECTURE.md "Adding an actor kind").
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Actors {
    /// How long an idle actor (a user with no session) stays in memory before it is let go;
    /// its state reloads from storage on its next message. 0: at once.
    pub passivate_after_ms: u64,
}

/// The cluster (ARCHITECTURE.md "Cluster"). An empty `node_name` runs a single node: no
/// gossip, no transport.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    /// Unique and stable across restarts: placement hashes names.
    pub node_name: String,
    /// UDP address for SWIM gossip (foca).
    pub gossip: String,
    /// TCP address of the node-to-node transport.
    pub transport: String,
    /// Gossip addresses of nodes to join through (this node's own is skipped).
    pub seeds: Vec<String>,
    /// Members of each slot's Raft group: copies of its state (ARCHITECTURE.md "Replicated
    /// state on Raft").
    pub replication: usize,
    /// Slots the keys hash into, each one Raft group; fixed when the cluster is made (the
    /// node refuses to start on a store made with another count). A single node has them too.
    pub slots: u32,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            node_name: String::new(),
            gossip: "127.0.0.1:7946".into(),
            transport: "127.0.0.1:7947".into(),
            seeds: Vec::new(),
            replication: 3,
            slots: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Prometheus `/metrics` and `/health`; `""` turns them off.
    pub listen: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            listen: "127.0.0.1:5280".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub domains: Vec<String>,
    pub data_dir: PathBuf,
    /// Glommio shards (one executor pinned per core); 0 = one per available core.
    pub shards: usize,
    /// Seconds to let clients go on SIGTERM before shards stop anyway.
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct C2s {
    pub listen: SocketAddr,
    /// Direct TLS (XEP-0368); empty string turns it off.
    pub direct_tls_listen: String,
    pub require_tls: bool,
    pub max_stanza_bytes: usize,
    pub max_depth: usize,
    pub max_attributes: usize,
    /// Messages a session's mailbox holds before senders get `resource-constraint`.
    pub mailbox: usize,
    /// Seconds a connection has to finish TLS, authentication and binding.
    pub negotiation_timeout_secs: u64,
    /// Seconds a write to a client may block before the connection is dropped.
    pub write_timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationMode {
    Closed,
    Open,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Registration {
    pub mode: RegistrationMode,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    pub anonymous: bool,
    pub scram_iterations: u32,
    /// Failed authentications per IP per minute before further attempts are refused.
    pub max_failures_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Offline {
    pub max_per_user: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Roster {
    pub max_items: usize,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// A tracing filter, e.g. "info" or "starling=debug".
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: Server::default(),
            c2s: C2s::default(),
            registration: Registration {
                mode: RegistrationMode::Closed,
            },
            auth: Auth::default(),
            offline: Offline { max_per_user: 100 },
            roster: Roster { max_items: 1000 },
            tls: Tls::default(),
            log: Log { level: "info".into() },
            metrics: Metrics::default(),
            cluster: Cluster::default(),
            actors: Actors::default(),
        }
    }
}

impl Default for Server {
    fn default() -> Self {
        Server {
            domains: vec!["localhost".into()],
            data_dir: "./data".into(),
            shards: 0,
            shutdown_grace_secs: 5,
        }
    }
}

impl Default for C2s {
    fn default() -> Self {
        C2s {
            listen: "0.0.0.0:5222".parse().expect("valid"),
            direct_tls_listen: "0.0.0.0:5223".into(),
            require_tls: true,
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            max_attributes: 64,
            mailbox: 1024,
            negotiation_timeout_secs: 30,
            write_timeout_secs: 30,
        }
    }
}

impl Default for Registration {
    fn default() -> Self {
        Registration {
            mode: RegistrationMode::Closed,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            anonymous: false,
            scram_iterations: 4096,
            max_failures_per_minute: 5,
        }
    }
}

impl Default for Offline {
    fn default() -> Self {
        Offline { max_per_user: 100 }
    }
}

impl Default for Roster {
    fn default() -> Self {
        Roster { max_items: 1000 }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log { level: "info".into() }
    }
}

impl Config {
    /// Loads the file (if any), applies `key=value` overrides (values in TOML syntax; bare
    /// words are taken as strings), and validates.
    pub fn load(file: Option<&std::path::Path>, overrides: &[String]) -> Result<Config, String> {
        let mut root: toml::Table = match file {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| format!("cannot read config {}: {e}", p.display()))?;
                text.parse().map_err(|e| format!("config {}: {e}", p.display()))?
            }
            None => toml::Table::new(),
        };
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| format!("--set {o:?}: expected section.key=value"))?;
            let value: toml::Value = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            let mut parts: Vec<&str> = key.trim().split('.').collect();
            let last = parts
                .pop()
                .filter(|l| !l.is_empty())
                .ok_or_else(|| format!("--set {o:?}: empty key"))?;
            let mut table = &mut root;
            for p in parts {
                table = table
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| format!("--set {o:?}: {p} is not a section"))?;
            }
            table.insert(last.to_string(), value);
        }
        let cfg: Config = toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| format!("invalid configuration: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.server.domains.is_empty() {
            return Err("server.domains: at least one domain is required".into());
        }
        for d in &self.server.domains {
            if jid::BareJid::new(d).map(|j| j.node().is_some()).unwrap_or(true) {
                return Err(format!("server.domains: {d:?} is not a valid domain"));
            }
        }
        if !self.c2s.direct_tls_listen.is_empty() {
            self.c2s
                .direct_tls_listen
                .parse::<SocketAddr>()
                .map_err(|e| format!("c2s.direct_tls_listen: {e}"))?;
        }
        if !self.metrics.listen.is_empty() {
            self.metrics
                .listen
                .parse::<SocketAddr>()
                .map_err(|e| format!("metrics.listen: {e}"))?;
        }
        if !(1..=4096).contains(&self.cluster.slots) {
            return Err("cluster.slots: from 1 to 4096".into());
        }
        if !self.cluster.node_name.is_empty() {
            let c = &self.cluster;
            if c.node_name.len() > 64
                || !c
                    .node_name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
            {
                return Err("cluster.node_name: up to 64 letters, digits, '-', '_' or '.'".into());
            }
            c.gossip
                .parse::<SocketAddr>()
                .map_err(|e| format!("cluster.gossip: {e}"))?;
            c.transport
                .parse::<SocketAddr>()
                .map_err(|e| format!("cluster.transport: {e}"))?;
            for s in &c.seeds {
                s.parse::<SocketAddr>()
                    .map_err(|e| format!("cluster.seeds: {s:?}: {e}"))?;
            }
            if c.replication == 0 {
                return Err("cluster.replication: at least 1".into());
            }
            if self.actors.passivate_after_ms > 0 {
                // An idle actor kept in memory through a membership change can serve
                // stale state; it is let go at the change, but the simulator still finds
                // presence and roster violations with it on three nodes (sim/README.md).
                return Err(
                    "actors.passivate_after_ms: must be 0 on a cluster member (cluster.node_name) for now".into(),
                );
            }
        }
        if self.c2s.max_stanza_bytes < 1024 {
            return Err("c2s.max_stanza_bytes: must be at least 1024".into());
        }
        if self.auth.scram_iterations < 4096 {
            return Err("auth.scram_iterations: RFC 7677 asks for at least 4096".into());
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err("tls.cert and tls.key go together".into());
        }
        if self.c2s.mailbox == 0 || self.offline.max_per_user == 0 {
            return Err("c2s.mailbox and offline.max_per_user must be positive".into());
        }
        if self.c2s.negotiation_timeout_secs == 0 || self.c2s.write_timeout_secs == 0 {
            return Err("c2s.negotiation_timeout_secs and c2s.write_timeout_secs must be positive".into());
        }
        Ok(())
    }

    pub fn shards(&self) -> usize {
        match self.server.shards {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        }
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.listen.parse().ok()
    }

    pub fn direct_tls_addr(&self) -> Option<SocketAddr> {
        self.c2s.direct_tls_listen.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_overrides_and_errors_name_the_key() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.server.domains, vec!["localhost"]);
        assert_eq!(c.offline.max_per_user, 100);
        let c = Config::load(
            None,
            &[
                "offline.max_per_user=3".into(),
                "registration.mode=open".into(),
                "c2s.listen=127.0.0.1:1".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.offline.max_per_user, 3);
        assert_eq!(c.registration.mode, RegistrationMode::Open);
        let e = Config::load(None, &["c2s.bogus=1".into()]).unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::load(None, &["registration.mode=sometimes".into()]).unwrap_err();
        assert!(e.contains("sometimes") || e.contains("mode"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[server]\ndomains = [\"example.org\"]\nshardz = 2\n").unwrap();
        let e = Config::load(Some(&f), &[]).unwrap_err();
        assert!(e.contains("shardz"), "{e}");
    }

    #[test]
    fn cluster_keys_are_checked() {
        let c = Config::load(None, &[]).unwrap();
        assert!(c.cluster.node_name.is_empty(), "single node by default");
        let c = Config::load(
            None,
            &[
                "cluster.node_name=n1".into(),
                "cluster.seeds=[\"127.0.0.1:7001\"]".into(),
                "cluster.replication=3".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.cluster.seeds, vec!["127.0.0.1:7001"]);
        assert_eq!(c.cluster.replication, 3);
        for (bad, key) in [
            ("cluster.gossip=nowhere", "cluster.gossip"),
            ("cluster.transport=1.2.3.4", "cluster.transport"),
            ("cluster.seeds=[\"x\"]", "cluster.seeds"),
            ("cluster.replication=0", "cluster.replication"),
        ] {
            let e = Config::load(None, &["cluster.node_name=n1".into(), bad.into()]).unwrap_err();
            assert!(e.contains(key), "{bad}: {e}");
        }
        let e = Config::load(None, &["cluster.node_name=a b".into()]).unwrap_err();
        assert!(e.contains("cluster.node_name"), "{e}");
        let keep = "actors.passivate_after_ms=30000".to_string();
        let c = Config::load(None, std::slice::from_ref(&keep)).unwrap();
        assert_eq!(c.actors.passivate_after_ms, 30_000, "a single node keeps idle actors");
        let e = Config::load(None, &["cluster.node_name=n1".into(), keep]).unwrap_err();
        assert!(e.contains("actors.passivate_after_ms"), "{e}");
    }
}
