//! A vfmig VM as a libvirt domain: the definition written by `vfmig libvirt domain-xml`, and
//! the companion's settings read back from a domain's XML by the hook.
//!
//! What makes a domain a vfmig domain, in libvirt's own terms:
//! - `<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>`: guest RAM
//!   the companion can map (vhost-user `SET_MEM_TABLE` passes its file descriptors);
//! - `<interface type='vhostuser'>` with `<source type='unix' path='…/vhost-user.sock'
//!   mode='client'/>`: QEMU connects to the companion, which is its vhost-user-net backend;
//! - `<metadata><vfmig:companion …/></metadata>`: how the hook starts the companion (fabric
//!   port, cluster file, key, and the negative control's `tracking='off'`).

use std::path::{Path, PathBuf};

use super::XMLNS;

/// What the hook needs to start a domain's companion, as kept in the domain's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompanionSettings {
    /// The soft VF's fabric port; with the host's fabric address (see
    /// [`HostConfig`](super::host::HostConfig)) it is the `--fabric-listen` address. `None`:
    /// no soft VF.
    pub fabric_port: Option<u16>,
    /// The job's cluster file (`--cluster`), the same path on every host.
    pub cluster: Option<PathBuf>,
    /// This VM's fabric key (`--fabric-key`), the same path on every host the VM may run on.
    pub fabric_key: Option<PathBuf>,
    /// `--insecure-fabric` (benchmarks only).
    pub insecure_fabric: bool,
    /// `--unsafe-no-tracking`: device writes are not logged (the negative control).
    pub unsafe_no_tracking: bool,
}

/// A domain's vfmig parts, read from its XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfmigDomain {
    /// The domain's name (the VM's name on the fabric too).
    pub name: String,
    /// The vhost-user socket QEMU connects to: the companion listens on it.
    pub socket: PathBuf,
    /// The companion's settings.
    pub companion: CompanionSettings,
}

/// Why a domain's XML could not be read as a vfmig domain.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// Not well-formed XML.
    #[error("the domain XML is not well-formed")]
    Xml(#[from] roxmltree::Error),
    /// No `<name>`.
    #[error("the domain XML has no <name>")]
    NoName,
    /// vfmig metadata, but no vhost-user interface for the companion.
    #[error(
        "domain {0} has vfmig metadata but no <interface type='vhostuser'> with a unix socket \
         source: define it with `vfmig libvirt domain-xml`"
    )]
    NoVhostUser(String),
    /// An attribute of the vfmig element has a value that does not parse.
    #[error("domain {domain}: vfmig attribute {attr}='{value}' is invalid: {why}")]
    Attribute {
        /// The domain.
        domain: String,
        /// The attribute.
        attr: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        why: &'static str,
    },
}

/// Reads a domain's vfmig parts; `Ok(None)` for a domain without vfmig metadata (not ours).
pub fn read(xml: &str) -> Result<Option<VfmigDomain>, DomainError> {
    let doc = roxmltree::Document::parse(xml)?;
    let root = doc.root_element();
    let Some(meta) = root
        .descendants()
        .find(|n| n.tag_name().namespace() == Some(XMLNS) && n.tag_name().name() == "companion")
    else {
        return Ok(None);
    };
    let name = root
        .children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(DomainError::NoName)?
        .to_string();
    let socket = root
        .descendants()
        .filter(|n| n.has_tag_name("interface") && n.attribute("type") == Some("vhostuser"))
        .flat_map(|i| i.children())
        .find(|s| s.has_tag_name("source") && s.attribute("type") == Some("unix"))
        .and_then(|s| s.attribute("path"))
        .map(PathBuf::from)
        .ok_or_else(|| DomainError::NoVhostUser(name.clone()))?;
    let flag = |attr: &'static str, on: &str, off: &str| -> Result<bool, DomainError> {
        match meta.attribute(attr) {
            None => Ok(false),
            Some(v) if v == on => Ok(true),
            Some(v) if v == off => Ok(false),
            Some(v) => Err(DomainError::Attribute {
                domain: name.clone(),
                attr,
                value: v.into(),
                why: "expected one of the two documented values",
            }),
        }
    };
    let fabric_port = match meta.attribute("fabric-port") {
        None => None,
        Some(v) => Some(v.parse::<u16>().map_err(|_| DomainError::Attribute {
            domain: name.clone(),
            attr: "fabric-port",
            value: v.into(),
            why: "expected a TCP port (1-65535)",
        })?),
    };
    let companion = CompanionSettings {
        fabric_port,
        cluster: meta.attribute("cluster").map(PathBuf::from),
        fabric_key: meta.attribute("fabric-key").map(PathBuf::from),
        insecure_fabric: flag("insecure-fabric", "yes", "no")?,
        unsafe_no_tracking: flag("tracking", "off", "on")?,
    };
    Ok(Some(VfmigDomain {
        name,
        socket,
        companion,
    }))
}

/// A vfmig VM to define in libvirt.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    /// The domain's name.
    pub name: String,
    /// `kvm`, or `qemu` (TCG) where KVM is unusable.
    pub domain_type: String,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The NIC's MAC address.
    pub mac: String,
    /// Where the companion's socket lives: `RUN_DIR/NAME/vhost-user.sock`.
    pub run_dir: PathBuf,
    /// QEMU's binary.
    pub emulator: PathBuf,
    /// A direct kernel boot (kernel, initrd, command line), as the test guest boots.
    pub kernel: Option<(PathBuf, PathBuf, String)>,
    /// A boot disk image (qcow2), as an operator's guest boots.
    pub disk: Option<PathBuf>,
    /// Where the serial console goes (a file); `None`: a pty.
    pub serial_log: Option<PathBuf>,
    /// The companion's settings.
    pub companion: CompanionSettings,
}

/// The vhost-user socket of domain `name` under `run_dir`.
pub fn socket_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(name).join("vhost-user.sock")
}

/// A MAC address derived from the VM's name (locally administered, stable across hosts, so
/// the VM keeps it through migrations).
pub fn mac_for(name: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_64(name.as_bytes()).to_le_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

/// Escapes text for XML content and attribute values.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn p(path: &Path) -> String {
    esc(&path.display().to_string())
}

/// The domain's XML.
pub fn to_xml(spec: &DomainSpec) -> String {
    let c = &spec.companion;
    let mut meta = format!("    <vfmig:companion xmlns:vfmig='{XMLNS}'");
    if let Some(port) = c.fabric_port {
        meta += &format!(" fabric-port='{port}'");
    }
    if let Some(cluster) = &c.cluster {
        meta += &format!(" cluster='{}'", p(cluster));
    }
    if let Some(key) = &c.fabric_key {
        meta += &format!(" fabric-key='{}'", p(key));
    }
    if c.insecure_fabric {
        meta += " insecure-fabric='yes'";
    }
    if c.unsafe_no_tracking {
        meta += " tracking='off'";
    }
    meta += "/>\n";
    let mut os = String::from(
        "    <type arch='x86_64' machine='q35'>hvm</type>
",
    );
    if let Some((kernel, initrd, cmdline)) = &spec.kernel {
        os += &format!(
            "    <kernel>{}</kernel>\n    <initrd>{}</initrd>\n    <cmdline>{}</cmdline>\n",
            p(kernel),
            p(initrd),
            esc(cmdline)
        );
    }
    let disk = spec.disk.as_ref().map_or(String::new(), |d| {
        format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
             <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n",
            p(d)
        )
    });
    let serial = match &spec.serial_log {
        Some(log) => format!(
            "    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>\n",
            p(log)
        ),
        None => "    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n".into(),
    };
    format!(
        "<domain type='{dtype}'>\n  <name>{name}</name>\n  <metadata>\n{meta}  </metadata>\n  \
         <memory unit='MiB'>{mem}</memory>\n  <memoryBacking>\n    <source type='memfd'/>\n    \
         <access mode='shared'/>\n  </memoryBacking>\n  <vcpu>{vcpus}</vcpu>\n  <os>\n{os}  </os>\n  \
         <on_poweroff>destroy</on_poweroff>\n  <on_crash>destroy</on_crash>\n  <devices>\n    \
         <emulator>{emulator}</emulator>\n{disk}    <interface type='vhostuser'>\n      \
         <mac address='{mac}'/>\n      <source type='unix' path='{socket}' mode='client'/>\n      \
         <model type='virtio'/>\n      <rom enabled='no'/>\n    </interface>\n{serial}    \
         <memballoon model='none'/>\n  </devices>\n</domain>\n",
        dtype = esc(&spec.domain_type),
        name = esc(&spec.name),
        mem = spec.memory_mib,
        vcpus = spec.vcpus,
        emulator = p(&spec.emulator),
        mac = esc(&spec.mac),
        socket = p(&socket_path(&spec.run_dir, &spec.name)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "a".into(),
            domain_type: "qemu".into(),
            memory_mib: 256,
            vcpus: 1,
            mac: mac_for("a"),
            run_dir: PathBuf::from("/run/vfmig"),
            emulator: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            kernel: Some((
                "/k/vmlinuz".into(),
                "/k/initrd".into(),
                "console=ttyS0 memmap=16M$0x18000000 <&>".into(),
            )),
            disk: None,
            serial_log: Some("/run/vfmig/a/serial.log".into()),
            companion: CompanionSettings {
                fabric_port: Some(7000),
                cluster: Some("/etc/vfmig/job/cluster.json".into()),
                fabric_key: Some("/etc/vfmig/job/a.key".into()),
                insecure_fabric: false,
                unsafe_no_tracking: true,
            },
        }
    }

    #[test]
    fn the_written_domain_reads_back_with_its_companion_settings() {
        let s = spec();
        let xml = to_xml(&s);
        assert!(xml.contains("<source type='memfd'/>") && xml.contains("<access mode='shared'/>"));
        assert!(
            xml.contains("&lt;&amp;&gt;"),
            "the command line is escaped: {xml}"
        );
        let d = read(&xml).unwrap().expect("a vfmig domain");
        assert_eq!(d.name, "a");
        assert_eq!(d.socket, PathBuf::from("/run/vfmig/a/vhost-user.sock"));
        assert_eq!(d.companion, s.companion);
    }

    #[test]
    fn a_domain_without_vfmig_metadata_is_not_ours() {
        let xml = "<domain type='kvm'><name>other</name><devices/></domain>";
        assert!(read(xml).unwrap().is_none());
    }

    #[test]
    fn vfmig_metadata_without_a_vhost_user_interface_or_with_a_bad_port_is_an_error() {
        let meta =
            format!("<metadata><c:companion xmlns:c='{XMLNS}' fabric-port='70000'/></metadata>");
        let no_nic = format!("<domain><name>x</name>{meta}<devices/></domain>");
        assert!(matches!(read(&no_nic), Err(DomainError::NoVhostUser(n)) if n == "x"));
        let nic = "<devices><interface type='vhostuser'><source type='unix' path='/s' \
                   mode='client'/></interface></devices>";
        let bad_port = format!("<domain><name>x</name>{meta}{nic}</domain>");
        assert!(matches!(
            read(&bad_port),
            Err(DomainError::Attribute {
                attr: "fabric-port",
                ..
            })
        ));
        assert!(read("<domain><name>").is_err(), "not well-formed");
    }

    #[test]
    fn the_mac_is_stable_and_locally_administered() {
        assert_eq!(mac_for("a"), mac_for("a"));
        assert_ne!(mac_for("a"), mac_for("b"));
        assert!(mac_for("a").starts_with("52:54:00:"));
    }
}
