//! Benchmark scenarios (TOML), in the spirit of Tsung's and amoc's: who logs in, how fast,
//! over what, and what they do once online.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// A name for the report.
    pub name: String,
    /// The XMPP domain the users live on.
    pub domain: String,
    /// Registered users: `{user_prefix}{1..=users}@{domain}`, all with `password`.
    pub users: usize,
    pub user_prefix: String,
    pub password: String,
    /// How many of them log in (the first `online_users`); default: all.
    pub online_users: Option<usize>,
    /// Arrival rate of logins, per second.
    pub login_rate: f64,
    /// STARTTLS before authenticating.
    pub tls: bool,
    /// PLAIN, SCRAM-SHA-1 or SCRAM-SHA-256.
    pub mechanism: String,
    /// Contacts per user (neighbours on a ring of all users), mutual subscriptions.
    pub roster_size: usize,
    /// Presence changes (away/available) each online user makes during the measured period.
    pub presence_changes: u32,
    /// One-to-one chat messages each online user sends per second, to online contacts.
    pub messages_per_user_per_sec: f64,
    /// Body size of each message in bytes (at least the timestamp it carries).
    pub message_bytes: usize,
    /// The measured period, after everyone is online and after the warm-up.
    pub duration_secs: f64,
    /// Load runs but is not measured for this long first.
    pub warmup_secs: f64,
    /// Client connections are spread over this many loopback source addresses
    /// (127.0.0.1, 127.0.0.2, …) so that ephemeral ports do not cap the session count.
    pub source_addrs: u32,
    /// Load-generator threads (each a single-threaded runtime).
    pub threads: usize,
    /// Give up on a login that has not completed in this many seconds.
    pub login_timeout_secs: f64,
    /// The share of messages sent to users who are not online (among users past
    /// `online_users`): the server stores them (XEP-0160), and the report counts them as
    /// stored rather than lost.
    pub offline_share: f64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "default".into(),
            domain: "localhost".into(),
            users: 1000,
            user_prefix: "bench".into(),
            password: "bench-secret".into(),
            online_users: None,
            login_rate: 500.0,
            tls: false,
            mechanism: "PLAIN".into(),
            roster_size: 10,
            presence_changes: 1,
            messages_per_user_per_sec: 1.0,
            message_bytes: 64,
            duration_secs: 20.0,
            warmup_secs: 3.0,
            source_addrs: 16,
            threads: 1,
            login_timeout_secs: 30.0,
            offline_share: 0.0,
        }
    }
}

impl Scenario {
    /// Reads a scenario file, then applies `key=value` overrides (TOML values; a bare word
    /// is taken as a string).
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for o in overrides {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| format!("--param {o}: expected KEY=VALUE"))?;
            let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(v.to_string()));
            table.insert(k.trim().to_string(), value);
        }
        let s: Scenario = table.try_into().map_err(|e| format!("{}: {e}", path.display()))?;
        s.check()?;
        Ok(s)
    }

    pub fn check(&self) -> Result<(), String> {
        if self.users == 0 {
            return Err("users must be at least 1".into());
        }
        if self.online() > self.users {
            return Err("online_users cannot exceed users".into());
        }
        if self.login_rate <= 0.0 {
            return Err("login_rate must be positive".into());
        }
        if !matches!(self.mechanism.as_str(), "PLAIN" | "SCRAM-SHA-1" | "SCRAM-SHA-256") {
            return Err(format!(
                "mechanism {:?}: use PLAIN, SCRAM-SHA-1 or SCRAM-SHA-256",
                self.mechanism
            ));
        }
        if self.roster_size >= self.users || self.roster_size % 2 == 1 {
            return Err("roster_size must be even (contacts on both sides of a ring) and below users".into());
        }
        if self.source_addrs == 0 || self.source_addrs > 250 * 250 {
            return Err("source_addrs must be between 1 and 62500".into());
        }
        if self.threads == 0 {
            return Err("threads must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.offline_share) {
            return Err("offline_share must be between 0 and 1".into());
        }
        if self.offline_share > 0.0 && self.online() >= self.users {
            return Err("offline_share needs users beyond online_users to send to".into());
        }
        if self.messages_per_user_per_sec < 0.0 || self.duration_secs <= 0.0 || self.warmup_secs < 0.0 {
            return Err("rates and durations must not be negative (duration positive)".into());
        }
        Ok(())
    }

    pub fn online(&self) -> usize {
        self.online_users.unwrap_or(self.users)
    }

    /// Local part of user `i` (0-based).
    pub fn local(&self, i: usize) -> String {
        format!("{}{}", self.user_prefix, i + 1)
    }

    /// The contacts of user `i`: its ring neighbours on both sides.
    pub fn contacts(&self, i: usize) -> Vec<usize> {
        let n = self.users;
        let mut out = Vec::with_capacity(self.roster_size);
        let mut d = 1;
        while out.len() < self.roster_size {
            out.push((i + d) % n);
            if out.len() < self.roster_size {
                out.push((i + n - d) % n);
            }
            d += 1;
        }
        out
    }

    /// The loopback source address of connection `i`.
    pub fn source_addr(&self, i: usize) -> std::net::Ipv4Addr {
        let k = (i as u32) % self.source_addrs;
        std::net::Ipv4Addr::new(127, 0, (k / 250) as u8, (k % 250) as u8 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contacts_are_mutual_ring_neighbours() {
        let s = Scenario {
            users: 10,
            roster_size: 4,
            ..Scenario::default()
        };
        assert_eq!(s.contacts(0), vec![1, 9, 2, 8]);
        for i in 0..10 {
            for c in s.contacts(i) {
                assert!(s.contacts(c).contains(&i), "{i} and {c} are not mutual");
            }
        }
    }

    #[test]
    fn bad_scenarios_are_refused_with_the_reason() {
        let s = Scenario {
            mechanism: "DIGEST-MD5".into(),
            ..Scenario::default()
        };
        assert!(s.check().unwrap_err().contains("mechanism"));
        let e = toml::from_str::<Scenario>("userz = 3").unwrap_err().to_string();
        assert!(e.contains("userz"), "{e}");
        let all_online = Scenario {
            offline_share: 0.5,
            ..Scenario::default()
        };
        assert!(all_online.check().unwrap_err().contains("online_users"));
        let half = Scenario {
            offline_share: 0.5,
            online_users: Some(500),
            ..Scenario::default()
        };
        assert!(half.check().is_ok());
        let too_much = Scenario {
            offline_share: 1.5,
            ..half
        };
        assert!(too_much.check().unwrap_err().contains("offline_share"));
    }

    #[test]
    fn source_addresses_spread_over_loopback() {
        let s = Scenario {
            source_addrs: 300,
            ..Scenario::default()
        };
        assert_eq!(s.source_addr(0).to_string(), "127.0.0.1");
        assert_eq!(s.source_addr(251).to_string(), "127.0.1.2");
        assert_eq!(s.source_addr(300).to_string(), "127.0.0.1");
    }
}
