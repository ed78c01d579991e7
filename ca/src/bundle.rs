//! What a site receives besides its certificate: its `agent.toml` and `start.sh`.

use std::path::Path;

use crate::authority::{CaError, write};

/// A site bundle's `agent.toml` and `start.sh`.
pub(crate) fn write_agent_files(
    dir: &Path,
    site: &str,
    coordinator_url: &str,
    coordinator_names: &[String],
) -> Result<(), CaError> {
    let server_name = coordinator_names
        .first()
        .cloned()
        .unwrap_or_else(|| "localhost".into());
    write(
        &dir.join("agent.toml"),
        &format!(
            r#"# Cohort agent for site {site}. Fill in [data]: the path of this site's CSV. The data
# schema comes from the coordinator (signed); add [data.rename] if a column is named
# differently here, e.g.  [data.rename]  "Heart rate" = "thalach".
site = "{site}"

[coordinator]
url = "{coordinator_url}"
server_name = "{server_name}"

[tls]
ca_cert = "ca.pem"
cert = "cert.pem"
key = "key.pem"
# The federation's members, signed by the CA: only these sites are accepted as peers. Newer
# versions from the coordinator replace this file.
manifest = "manifest.toml"

[data]
csv = "data.csv"
test_fraction = 0.34
split_seed = 42

"#
        ),
    )?;
    write(
        &dir.join("start.sh"),
        &format!(
            r#"#!/bin/sh
# Site {site}: the one command that starts this site's Cohort agent. Put the site's CSV at
# data.csv beside this file (or point [data] csv in agent.toml at it), then run ./start.sh.
# It needs cohort-agent on PATH, or COHORT_AGENT set to its path. Exit codes: 0 training
# finished, 1 runtime failure, 2 configuration (e.g. no data.csv), 3 refused for good.
set -eu
cd "$(dirname "$0")"
exec "${{COHORT_AGENT:-cohort-agent}}" run --config agent.toml "$@"
"#
        ),
    )?;
    Ok(())
}
