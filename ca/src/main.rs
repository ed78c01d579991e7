//! `cohort-ca`: the consortium's certificate authority. Run it on a machine the coordinator's
//! operator does not control (ideally offline); it never needs the network.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cohort_ca::{DEFAULT_VALIDITY_DAYS, Enrolment, demo_keys};

#[derive(Debug, Parser)]
#[command(
    name = "cohort-ca",
    version,
    about = "The Cohort federation's certificate authority: enrol sites and the coordinator from their own requests, revoke, and publish the signed federation manifest",
    long_about = "The Cohort federation's certificate authority, held by the consortium (never by \
        the coordinator's operator: whoever holds ca.key decides who is a member). Sites make \
        their keys with `cohort-agent enroll`, the coordinator's host with `cohort-coordinator \
        enroll`; this tool signs their requests and sees only public keys. Every change \
        publishes a new version of the federation manifest that agents pin.\n\nExit codes: 0 \
        done, 2 refused (the message says why: a bad request, an existing key, no CA)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Site,
    Evaluation,
    Coordinator,
}

/// What a new bundle is made with: its certificate's validity and what its agent.toml names.
#[derive(Debug, clap::Args)]
struct BundleArgs {
    /// Validity of the certificates signed, in days.
    #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
    validity_days: u32,
    /// Names the coordinator is reached at (a new site's agent.toml server_name is the first).
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    coordinator_names: Vec<String>,
    /// URL written into a new site's agent.toml.
    #[arg(long, default_value = "https://localhost:7700")]
    coordinator_url: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the CA in --ca: ca.pem, ca.key (keep it offline), an empty registry and CRL,
    /// and manifest version 1 with no members.
    Init {
        #[arg(long)]
        ca: PathBuf,
        /// Validity of the certificates it will sign, in days (the CA gets ten years, or more).
        #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
        validity_days: u32,
    },
    /// Sign a certificate signing request (from `cohort-agent enroll` or `cohort-coordinator
    /// enroll`): writes the bundle (--ca/sites/NAME or --ca/coordinator), the registry, the
    /// CRL and a new manifest version. A second request for a site renews it.
    Sign {
        #[arg(long)]
        ca: PathBuf,
        /// The request file (request.csr.pem).
        csr: PathBuf,
        /// What the request is for.
        #[arg(long, value_enum, default_value = "site")]
        role: RoleArg,
        #[command(flatten)]
        bundle: BundleArgs,
    },
    /// Revoke a site: its certificate goes to the CRL and the registry's revoked list, and a
    /// new manifest version no longer lists it.
    Revoke {
        #[arg(long)]
        ca: PathBuf,
        site: String,
    },
    /// Attach countersignatures (from `cohort-agent countersign` at member sites) to the
    /// current manifest and republish it: needed where agents set policy.manifest_quorum.
    Countersign {
        #[arg(long)]
        ca: PathBuf,
        /// Countersignature files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the current manifest: version, federation, members, countersignatures.
    Show {
        #[arg(long)]
        ca: PathBuf,
    },
    /// THROW-AWAY DEMOS ONLY: a CA plus a key and certificate for the coordinator and for
    /// every site, all made on this machine, so whoever runs it can sign as any site. Never
    /// for real hospitals: they enrol with `cohort-agent enroll` and `cohort-ca sign`.
    Demo {
        #[arg(long)]
        out: PathBuf,
        /// Comma-separated site names, e.g. hospital-a,hospital-b.
        #[arg(long, value_delimiter = ',', required_unless_present_any = ["add_site", "renew"])]
        sites: Vec<String>,
        /// Add one site (its key made here) to the demo CA in --out.
        #[arg(long, conflicts_with_all = ["sites", "renew"])]
        add_site: Option<String>,
        /// Give a demo site a new key and certificate; the old one is revoked as superseded.
        #[arg(long, conflicts_with = "sites")]
        renew: Option<String>,
        #[command(flatten)]
        bundle: BundleArgs,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> Result<String> {
    Ok(match command {
        Command::Init { ca, validity_days } => {
            cohort_ca::init(&ca, validity_days)?;
            format!(
                "created the CA in {}: keep ca.key offline, with the consortium, never on the coordinator's host",
                ca.display()
            )
        }
        Command::Sign {
            ca,
            csr,
            role,
            bundle:
                BundleArgs {
                    validity_days,
                    coordinator_names,
                    coordinator_url,
                },
        } => {
            let role = match role {
                RoleArg::Site => Enrolment::Site,
                RoleArg::Evaluation => Enrolment::Evaluation,
                RoleArg::Coordinator => Enrolment::Coordinator,
            };
            let pem = std::fs::read_to_string(&csr)
                .with_context(|| format!("reading {}", csr.display()))?;
            let bundle = cohort_ca::sign_request(
                &ca,
                &pem,
                role,
                &coordinator_url,
                &coordinator_names,
                validity_days,
            )
            .with_context(|| csr.display().to_string())?;
            let manifest = cohort_ca::current_manifest(&ca)?;
            format!(
                "signed {}: send {} to its owner (it holds no private key); {}",
                csr.display(),
                bundle.display(),
                manifest.summary()
            )
        }
        Command::Revoke { ca, site } => {
            cohort_ca::revoke(&ca, &site)?;
            format!(
                "revoked site {site}: give the coordinator {} and its registry, CRL and manifest; {}",
                ca.join("coordinator").display(),
                cohort_ca::current_manifest(&ca)?.summary()
            )
        }
        Command::Countersign { ca, files } => {
            let texts = files
                .iter()
                .map(|f| {
                    std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            let n = cohort_ca::countersign(&ca, &texts)?;
            let manifest = cohort_ca::current_manifest(&ca)?;
            format!(
                "manifest v{} now carries {n} countersignature(s); republished to {}",
                manifest.version(),
                ca.display()
            )
        }
        Command::Show { ca } => show(&cohort_ca::current_manifest(&ca)?),
        Command::Demo {
            out,
            sites,
            add_site,
            renew,
            bundle:
                BundleArgs {
                    validity_days,
                    coordinator_names,
                    coordinator_url,
                },
        } => {
            eprintln!(
                "WARNING: `cohort-ca demo` makes every site's private key on this machine: whoever holds {} can sign as any site. For throw-away demos only; real sites enrol with `cohort-agent enroll`.",
                out.display()
            );
            if let Some(site) = add_site {
                demo_keys::add_site(
                    &out,
                    &site,
                    &coordinator_url,
                    &coordinator_names,
                    validity_days,
                )?;
                format!(
                    "added demo site {site} (key made here) to {}",
                    out.display()
                )
            } else if let Some(site) = renew {
                demo_keys::renew(&out, &site, validity_days)?;
                format!("renewed demo site {site}: its old certificate is revoked")
            } else {
                demo_keys::provision(&demo_keys::ProvisionOptions {
                    out: out.clone(),
                    sites,
                    coordinator_names,
                    coordinator_url,
                    validity_days,
                })?;
                format!("demo federation in {} (every key made here)", out.display())
            }
        }
    })
}

/// The manifest as a table an operator can check against what the sites report.
fn show(m: &cohort_protocols::manifest::SignedManifest) -> String {
    let mut out = format!(
        "federation {}  manifest v{}  digest {}\n",
        m.manifest().federation,
        m.version(),
        cohort_protocols::hex::encode(&m.digest())
    );
    for member in &m.manifest().members {
        out.push_str(&format!(
            "  {:<24} {:<11} key {}…  serial {}\n",
            member.name,
            member.role.to_string(),
            member.key.get(..16).unwrap_or(&member.key),
            member.serial
        ));
    }
    let signers: Vec<&str> = m
        .countersignatures()
        .iter()
        .map(|c| c.member.as_str())
        .collect();
    out.push_str(&format!("countersigned by: [{}]", signers.join(", ")));
    out
}
