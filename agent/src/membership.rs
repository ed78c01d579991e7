//! What the site's `status` and `countersign` commands say and do about the federation
//! manifest it pins (see [`crate::trust`]): read from the site's own files, no coordinator
//! needed.

use anyhow::{Result, anyhow};
use cohort_protocols::manifest::SignedManifest;

/// What `cohort-agent status` prints: who this site is, the manifest it pins and the members it
/// accepts, read from its files (no coordinator needed).
pub fn report(cfg: &crate::AgentConfig) -> Result<String> {
    let creds = crate::credentials::load_credentials(cfg)?;
    let mut out = format!("site {}\n", creds.name);
    match creds.trust.current() {
        None => out.push_str(
            "manifest: none configured ([tls] manifest): every certificate of the CA is accepted as a peer\n",
        ),
        Some(m) => {
            out.push_str(&format!(
                "federation {}  manifest v{}  digest {}\n",
                m.manifest().federation,
                m.version(),
                cohort_protocols::hex::encode(&m.digest())
            ));
            for member in &m.manifest().members {
                let me = if member.name == creds.name { "  (this site)" } else { "" };
                out.push_str(&format!(
                    "  {:<24} {:<11} key {}…{me}\n",
                    member.name,
                    member.role.to_string(),
                    member.key.get(..16).unwrap_or(&member.key),
                ));
            }
            if m.manifest().member(&creds.name).is_none() {
                out.push_str("WARNING: this site is not a member of the manifest it pins\n");
            }
        }
    }
    out.push_str(&format!(
        "policy: manifest_quorum {} (0: the CA alone may add sites), min_sites {}, max_colluders {}, min_live_neighbours {}\n",
        cfg.policy.manifest_quorum,
        cfg.policy.min_sites,
        cfg.policy.max_colluders,
        cfg.policy.min_live_neighbours
    ));
    // Read only: `status` never creates the ledger.
    let path = cfg.state_dir().join(crate::ledger::FILE);
    if path.exists() {
        let ledger = crate::ledger::Ledger::open(&cfg.state_dir())?;
        match ledger.contributed() {
            Some(c) => out.push_str(&format!(
                "ledger {}: last input sent for round {} (attempt {}), survivors {}",
                path.display(),
                c.round,
                c.attempt,
                c.survivors
                    .as_ref()
                    .map_or("not yet accepted".to_string(), |s| s.join(", "))
            )),
            None => out.push_str(&format!("ledger {}: nothing sent yet", path.display())),
        }
    } else {
        out.push_str(&format!(
            "ledger {}: none yet (created when the agent starts)",
            path.display()
        ));
    }
    Ok(out)
}

/// `cohort-agent countersign`: checks `offered` (the CA's signature, a newer version of the
/// pinned manifest), describes what it changes, and signs it with the site's own key.
/// Returns (the changes, the countersignature file for the CA). The site should read the
/// changes before sending the file: that reading is what the quorum rule buys.
pub fn countersign(cfg: &crate::AgentConfig, offered: &[u8]) -> Result<(String, String)> {
    let creds = crate::credentials::load_credentials(cfg)?;
    let pinned = creds
        .trust
        .current()
        .ok_or_else(|| anyhow!("this site pins no manifest ([tls] manifest): there is nothing to compare the new one with"))?;
    let offered = SignedManifest::verify(offered, creds.trust.ca_key())
        .map_err(|e| anyhow!("the manifest to countersign: {e}"))?;
    if !offered
        .supersedes(&pinned)
        .map_err(|e| anyhow!("the manifest to countersign: {e}"))?
    {
        anyhow::bail!(
            "the manifest to countersign is version {}, the one this site already trusts: nothing to vouch for",
            offered.version()
        );
    }
    let me = offered.manifest().member(&creds.name);
    if !me.is_some_and(|m| {
        m.role == cohort_protocols::manifest::Role::Site
            && m.verifying_key() == Some(creds.signing_key.verifying_key())
    }) {
        anyhow::bail!(
            "the new manifest does not list this site ({}) as a training site with its own key: its countersignature would not count",
            creds.name
        );
    }
    let (old, new) = (pinned.manifest(), offered.manifest());
    let mut changes = format!("manifest v{} → v{}:\n", old.version, new.version);
    for m in &new.members {
        match old.member(&m.name) {
            None => changes.push_str(&format!("  + {} ({}, key {})\n", m.name, m.role, m.key)),
            Some(o) if o.key != m.key || o.role != m.role => changes.push_str(&format!(
                "  ~ {} ({} → {}, key {} → {})\n",
                m.name, o.role, m.role, o.key, m.key
            )),
            Some(_) => {}
        }
    }
    for o in &old.members {
        if new.member(&o.name).is_none() {
            changes.push_str(&format!("  - {} ({})\n", o.name, o.role));
        }
    }
    let c = offered.countersign(&creds.name, &creds.signing_key);
    Ok((changes, c.to_file(&offered)))
}
