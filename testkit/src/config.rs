//! Configuration files for the heart-disease federation. Each builder starts from what the
//! tests share and a test changes only the keys it is about, by dotted key or by merging a
//! TOML snippet, so what differs between two tests' coordinators is what the tests say.

use std::fmt;
use std::path::Path;

use crate::heart;
use crate::pki::{bundle, coordinator_tls};

/// A configuration file under construction.
#[derive(Debug, Clone)]
pub struct Toml(toml::Table);

impl Toml {
    pub fn parse(text: &str) -> Self {
        Toml(toml::from_str(text).unwrap_or_else(|e| panic!("test TOML: {e}\n{text}")))
    }

    /// Sets `key` (dotted: `rounds.count`), creating the tables on the way.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        let (tables, last) = match key.rsplit_once('.') {
            Some((tables, last)) => (tables.split('.').collect(), last),
            None => (Vec::new(), key),
        };
        let mut at = &mut self.0;
        for name in tables {
            at = at
                .entry(name)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("{name} in {key} is not a table"));
        }
        at.insert(last.into(), value.into());
        self
    }

    /// Sets `key` to a path.
    pub fn path(self, key: &str, path: &Path) -> Self {
        self.set(key, path.display().to_string())
    }

    /// Removes `key` (dotted); a key that is not there is a mistake in the test.
    pub fn remove(mut self, key: &str) -> Self {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or(key);
        let mut at = &mut self.0;
        for name in parts {
            at = at
                .get_mut(name)
                .and_then(toml::Value::as_table_mut)
                .unwrap_or_else(|| panic!("no table {name} for {key}"));
        }
        assert!(at.remove(last).is_some(), "no {key} to remove");
        self
    }

    /// Merges a TOML snippet: its tables into these, its values over these.
    pub fn merge(mut self, text: &str) -> Self {
        fn merge(into: &mut toml::Table, from: toml::Table) {
            for (key, value) in from {
                match (into.get_mut(&key), value) {
                    (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                    (_, value) => {
                        into.insert(key, value);
                    }
                }
            }
        }
        merge(&mut self.0, Toml::parse(text).0);
        self
    }

    /// The configuration as the binary's own parser reads it (`AgentConfig::parse`,
    /// `CoordinatorConfig::parse`); a refusal is a mistake in the test.
    pub fn build<T, E: fmt::Display>(&self, parse: impl FnOnce(&str) -> Result<T, E>) -> T {
        let text = self.to_string();
        parse(&text).unwrap_or_else(|e| panic!("test configuration refused: {e:#}\n{text}"))
    }

    /// Writes the file; its path.
    pub fn write(&self, path: &Path) -> std::path::PathBuf {
        std::fs::write(path, self.to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path.to_path_buf()
    }
}

impl fmt::Display for Toml {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&toml::to_string(&self.0).map_err(|_| fmt::Error)?)
    }
}

/// A coordinator for the four hospitals with the PKI in `pki` and its database in
/// `data_dir`: listening on an ephemeral port, all four sites in every round, logistic
/// regression on the 13 inputs, 20-bit quantisation in a 64-bit ring. Rounds, timeouts and
/// training steps are each test's to set.
pub fn coordinator(pki: &Path, data_dir: &Path) -> Toml {
    Toml::parse(&format!(
        r#"
listen = "127.0.0.1:0"
data_dir = {data_dir:?}
{tls}
[rounds]
min_sites = 4
[secagg]
quant_bits = 20
modulus_bits = 64
max_weight = 1000
[model]
kind = "logreg"
inputs = 13
[training]
learning_rate = 0.001
batch_size = 4
{schema}"#,
        tls = coordinator_tls(pki),
        schema = heart::SCHEMA,
    ))
}

/// `site`'s agent from its bundle in the PKI, dialling 127.0.0.1:`port`: its shipped CSV
/// (a third held out for testing, split seed 42), reconnecting within half a second, giving
/// up after two refusals, and asking for 2 live others (a federation of four, one of which
/// may drop out; the agent's own default asks for 5). The schema comes from the coordinator.
pub fn agent(pki: &Path, site: &str, port: u16) -> Toml {
    agent_in(&bundle(pki, site), site, port)
}

/// As [`agent`], from the bundle (`ca.pem`, `cert.pem`, `key.pem`) in `bundle`: another
/// project's, or one put together from two.
pub fn agent_in(bundle: &Path, site: &str, port: u16) -> Toml {
    Toml::parse(&format!(
        r#"
site = "{site}"
[coordinator]
url = "https://127.0.0.1:{port}"
server_name = "localhost"
[tls]
ca_cert = {ca:?}
cert = {cert:?}
key = {key:?}
[data]
csv = {csv:?}
test_fraction = 0.34
split_seed = 42
[reconnect]
initial_ms = 100
max_ms = 500
max_refusals = 2
[policy]
min_live_neighbours = 2
"#,
        ca = bundle.join("ca.pem"),
        cert = bundle.join("cert.pem"),
        key = bundle.join("key.pem"),
        csv = heart::csv(site),
    ))
}
