//! `vfmig`: one binary, one subcommand per job. This file parses the command line and hands
//! each subcommand to its module in [`cli`].

mod cli;

use clap::{Parser, Subcommand};

/// Live migration of VMs whose MPI jobs use an SR-IOV RDMA VF, with a stock QEMU.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-VM companion: QEMU's vhost-user-net backend, owner of the VF's path into
    /// guest RAM, which logs every page the VF writes into QEMU's dirty log.
    Companion(cli::companion::Args),
    /// Start a VM's companion and then QEMU, with all files in one run directory; stop both on
    /// Ctrl-C or when QEMU exits.
    Launch(cli::launch::Args),
    /// Migrate a VM: sets capabilities on both sides, `migrate-incoming` then `migrate`, follows
    /// progress, resumes the destination once, and prints a JSON summary.
    Migrate(cli::migrate::Args),
    /// Send one request to a companion's control socket and print its reply (JSON): for
    /// wrapper scripts and operators. Exits non-zero if the companion refuses it.
    Ctl(cli::ctl::Args),
    /// Read a migration's timeline (from --trace): print its phase table and the switchover's
    /// steps (the companions', in ms from the source's quiesce), and write an SVG with the
    /// timeline, the curves of remaining bytes and dirty rate, and the steps zoomed.
    Report(cli::report::Args),
    /// Benchmarks that compare whole migrations side by side in one run.
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
    /// Real VFs bound to vfio-pci: check one, run the self-test of every step the companion
    /// relies on, or run that self-test on an emulated SR-IOV VF inside a nested guest.
    #[command(subcommand)]
    Vf(cli::vf::VfCommand),
    /// The main job on this machine: two VMs with companions, a device writing guest RAM during
    /// precopy, one migration, and a check that no device write was lost. Its last output line
    /// is a JSON object.
    Demo(cli::demo::Args),
    /// The fabric's keys: a job key and one key pair per VM, for authenticated soft VFs.
    #[command(subcommand)]
    Keys(cli::keys::KeysCommand),
    /// libvirt: a vfmig VM as a libvirt domain, and the `qemu` hook that starts and stops its
    /// companion with it, so that `virsh` (or Nova) starts and migrates it.
    #[command(subcommand)]
    Libvirt(cli::libvirt::LibvirtCommand),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Companion(args) => cli::companion::run(args),
        Command::Launch(args) => cli::launch::run(args),
        Command::Migrate(args) => cli::migrate::run(args),
        Command::Ctl(args) => cli::ctl::run(args),
        Command::Report(args) => cli::report::run(args),
        Command::Bench(cmd) => cli::bench::run(cmd),
        Command::Vf(cmd) => cli::vf::run(cmd),
        Command::Demo(args) => cli::demo::run(args),
        Command::Keys(cmd) => cli::keys::run(cmd),
        Command::Libvirt(cmd) => cli::libvirt::run(cmd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn strategies_parse_by_their_kebab_case_names() {
        let cli = Cli::try_parse_from([
            "vfmig",
            "migrate",
            "--src-qmp",
            "s",
            "--dst-qmp",
            "d",
            "--uri",
            "tcp:127.0.0.1:1",
            "--strategy",
            "passthrough-hotplug",
            "--rank-control",
            "a",
            "--rank-control",
            "b",
        ])
        .unwrap();
        let Command::Migrate(args) = cli.command else {
            panic!("not migrate");
        };
        assert_eq!(
            args.strategy,
            vfmig::orchestrator::StrategyKind::PassthroughHotplug
        );
        assert_eq!(args.rank_control.len(), 2);
        assert!(Cli::try_parse_from(["vfmig", "demo", "--strategy", "sideways"]).is_err());
    }
}
