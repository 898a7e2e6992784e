//! `vfmig libvirt`: a vfmig VM as a libvirt domain (`domain-xml`), the libvirt `qemu` hook that
//! starts and stops its companion (`hook`), and the hook's installation (`install-hook`).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use vfmig::libvirt::domain::{self, CompanionSettings, DomainSpec};
use vfmig::libvirt::hook::{self, Plan};
use vfmig::libvirt::host::HostConfig;
use vfmig::libvirt::DEFAULT_RUN_DIR;

use super::{init_logging, vfmig_bin};

/// The subcommands of `vfmig libvirt`.
#[derive(clap::Subcommand)]
pub enum LibvirtCommand {
    /// Print a libvirt domain definition for a vfmig VM: memfd shared guest RAM, a vhost-user
    /// NIC on the companion's socket, and the companion's settings in the domain's metadata
    /// (which the hook reads). Define it with `virsh define FILE`.
    DomainXml(Box<DomainXmlArgs>),
    /// The libvirt `qemu` hook (libvirt runs it as `/etc/libvirt/hooks/qemu DOMAIN OPERATION
    /// SUB-OPERATION EXTRA`, the domain's XML on stdin): starts a vfmig domain's companion on
    /// `prepare` (a start or an incoming migration) and stops it on `release`; other domains
    /// and operations are left alone.
    Hook(HookArgs),
    /// Install the hook: write `HOOKS_DIR/qemu`, a script that runs this binary's `libvirt
    /// hook`. libvirt reads hooks when it starts: restart libvirtd (or virtqemud) after.
    InstallHook(InstallHookArgs),
}

/// The arguments of `vfmig libvirt domain-xml`.
#[derive(clap::Args)]
pub struct DomainXmlArgs {
    /// The domain's name; also the VM's name on the fabric (the cluster file's key).
    #[arg(long)]
    pub name: String,
    /// libvirt domain type: `kvm`, or `qemu` (TCG) where KVM is unusable.
    #[arg(long, default_value = "kvm")]
    pub domain_type: String,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// The NIC's MAC address (default: derived from the name, the same on every host).
    #[arg(long)]
    pub mac: Option<String>,
    /// Where the companion's socket and files live on each host: `RUN_DIR/NAME/`. Default:
    /// `run_dir` of /etc/vfmig/host.json, else /run/vfmig.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// QEMU's binary.
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    pub emulator: PathBuf,
    /// Boot this kernel directly (with --initrd and --cmdline), as vfmig's test guest does.
    #[arg(long, requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// The initrd of --kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line of --kernel.
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Boot from this qcow2 disk image instead.
    #[arg(long, conflicts_with = "kernel")]
    pub disk: Option<PathBuf>,
    /// Write the serial console to this file (default: a pty, `virsh console`).
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Run the soft VF: its fabric port (the host's `fabric_address` in /etc/vfmig/host.json
    /// gives the address).
    #[arg(long)]
    pub fabric_port: Option<u16>,
    /// The job's cluster file (same path on every host), as `vfmig companion --cluster`.
    #[arg(long, requires = "fabric_port")]
    pub cluster: Option<PathBuf>,
    /// This VM's fabric key (same path on every host it may run on), as `vfmig companion
    /// --fabric-key`.
    #[arg(long, requires = "fabric_port")]
    pub fabric_key: Option<PathBuf>,
    /// The fabric WITHOUT authentication (benchmarks only), as `vfmig companion
    /// --insecure-fabric`.
    #[arg(long, requires = "fabric_port")]
    pub insecure_fabric: bool,
    /// Device writes NOT logged during migrations: only for the negative control that proves
    /// the checks can fail, as `vfmig companion --unsafe-no-tracking`.
    #[arg(long)]
    pub unsafe_no_tracking: bool,
}

/// The arguments of `vfmig libvirt hook`.
#[derive(clap::Args)]
pub struct HookArgs {
    /// The domain's name.
    pub domain: String,
    /// libvirt's operation (`prepare`, `start`, `started`, `stopped`, `release`, `migrate`, …).
    pub operation: String,
    /// libvirt's sub-operation.
    #[arg(default_value = "-")]
    pub sub_operation: String,
    /// libvirt's extra argument.
    #[arg(default_value = "-")]
    pub extra: String,
}

/// The arguments of `vfmig libvirt install-hook`.
#[derive(clap::Args)]
pub struct InstallHookArgs {
    /// libvirt's hooks directory.
    #[arg(long, default_value = "/etc/libvirt/hooks")]
    pub hooks_dir: PathBuf,
    /// Replace a `qemu` hook that is not vfmig's.
    #[arg(long)]
    pub force: bool,
}

/// Runs a `vfmig libvirt` subcommand.
pub fn run(cmd: LibvirtCommand) -> Result<()> {
    match cmd {
        LibvirtCommand::DomainXml(a) => domain_xml(*a),
        LibvirtCommand::Hook(a) => run_hook(a),
        LibvirtCommand::InstallHook(a) => install_hook(a),
    }
}

fn domain_xml(a: DomainXmlArgs) -> Result<()> {
    let run_dir = match a.run_dir {
        Some(d) => d,
        None => HostConfig::load(&HostConfig::path())?
            .run_dir
            .unwrap_or_else(|| DEFAULT_RUN_DIR.into()),
    };
    let spec = DomainSpec {
        mac: a.mac.unwrap_or_else(|| domain::mac_for(&a.name)),
        name: a.name,
        domain_type: a.domain_type,
        memory_mib: a.memory_mib,
        vcpus: a.vcpus,
        run_dir,
        emulator: a.emulator,
        kernel: a.kernel.zip(a.initrd).map(|(k, i)| (k, i, a.cmdline)),
        disk: a.disk,
        serial_log: a.serial_log,
        companion: CompanionSettings {
            fabric_port: a.fabric_port,
            cluster: a.cluster,
            fabric_key: a.fabric_key,
            insecure_fabric: a.insecure_fabric,
            unsafe_no_tracking: a.unsafe_no_tracking,
        },
    };
    print!("{}", domain::to_xml(&spec));
    Ok(())
}

fn run_hook(a: HookArgs) -> Result<()> {
    init_logging("info");
    let mut xml = String::new();
    std::io::stdin()
        .read_to_string(&mut xml)
        .context("vfmig hook: cannot read the domain XML on stdin")?;
    if xml.trim().is_empty() {
        return Ok(()); // some operations pass no XML
    }
    let host = HostConfig::load(&HostConfig::path())?;
    match hook::plan(&a.operation, &xml, &host)? {
        Plan::Start { domain, args } => hook::start(&vfmig_bin()?, &domain, &args)?,
        Plan::Stop(domain) => hook::stop(&domain),
        Plan::MarkIncoming(domain) => hook::mark_incoming(&domain)?,
        Plan::Nothing => {}
    }
    Ok(())
}

/// The first line after the shebang of vfmig's hook script, to recognise it.
const MARK: &str = "# vfmig libvirt hook";

fn install_hook(a: InstallHookArgs) -> Result<()> {
    let path = a.hooks_dir.join("qemu");
    if let Ok(old) = std::fs::read_to_string(&path) {
        if !old.contains(MARK) && !a.force {
            bail!(
                "{} exists and is not vfmig's hook: merge vfmig's call (`{} libvirt hook \"$@\"`) \
                 into it, or replace it with --force",
                path.display(),
                vfmig_bin()?.display()
            );
        }
    }
    std::fs::create_dir_all(&a.hooks_dir)
        .with_context(|| format!("cannot create {}", a.hooks_dir.display()))?;
    let script = format!(
        "#!/bin/sh\n{MARK}: starts and stops the companions of vfmig domains (see `vfmig libvirt \
         hook --help`).\nexec {} libvirt hook \"$@\"\n",
        vfmig_bin()?.display()
    );
    std::fs::write(&path, script).with_context(|| format!("cannot write {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {} executable", path.display()))?;
    }
    eprintln!(
        "installed {}; restart libvirtd (or virtqemud) so that it reads it",
        path.display()
    );
    Ok(())
}
