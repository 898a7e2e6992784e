//! `vfmig keys`: the fabric's keys for a job.

use std::path::PathBuf;

use anyhow::{Context, Result};

use vfmig::vf::soft;

/// The subcommands of `vfmig keys`.
#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Write a job key and each VM's key pair into DIR (files of mode 0600), and the public keys
    /// and the job key file's path into the cluster file. Give each VM's companion (and its
    /// destination's, when it migrates) `--fabric-key DIR/NAME.key`.
    Generate {
        /// The cluster file (`{"vms": {"NAME": "host:port", ...}}`); rewritten with the keys.
        #[arg(long)]
        cluster: PathBuf,
        /// Where the key files go (created).
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Runs a `vfmig keys` subcommand.
pub fn run(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Generate { cluster, dir } => {
            let g = soft::generate_keys(&cluster, &dir).with_context(|| {
                format!("cannot generate the fabric keys of {}", cluster.display())
            })?;
            println!("job key: {}", g.job_key_file.display());
            for (vm, f) in &g.private_keys {
                println!("{vm}: --fabric-key {}", f.display());
            }
            Ok(())
        }
    }
}
