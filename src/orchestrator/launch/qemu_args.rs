//! The QEMU command line of a VM, from the option files of `qemu-patches-free-config/`
//! (compiled in; `config_dir` overrides them) with the VM's values in their placeholders.

use std::path::{Path, PathBuf};

use super::{LaunchError, Nic, Role, RunPaths, VmSpec, PASSTHROUGH_PORT};

const VM_ARGS: &str = include_str!("../../../qemu-patches-free-config/vm.args");
const DESTINATION_ARGS: &str = include_str!("../../../qemu-patches-free-config/destination.args");
const TEST_GUEST_ARGS: &str = include_str!("../../../qemu-patches-free-config/test-guest.args");
const VHOST_USER_NIC_ARGS: &str =
    include_str!("../../../qemu-patches-free-config/vhost-user-nic.args");
const PLAIN_NIC_ARGS: &str = include_str!("../../../qemu-patches-free-config/plain-nic.args");
const PASSTHROUGH_PORT_ARGS: &str =
    include_str!("../../../qemu-patches-free-config/passthrough-port.args");
const IP_NIC_ARGS: &str = include_str!("../../../qemu-patches-free-config/ip-nic.args");

/// Parses an option file: one option per line, `#` comments, the first space splits the option
/// from its value; placeholders `{key}` are replaced from `vars`.
pub fn parse_args(
    file: &str,
    text: &str,
    vars: &[(&str, String)],
) -> Result<Vec<String>, LaunchError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut filled = line.to_string();
        for (k, v) in vars {
            filled = filled.replace(&format!("{{{k}}}"), v);
        }
        if let Some(open) = filled.find('{') {
            if let Some(close) = filled[open..].find('}') {
                return Err(LaunchError::Config {
                    file: file.into(),
                    reason: format!(
                        "line {}: unknown placeholder {}",
                        n + 1,
                        &filled[open..open + close + 1]
                    ),
                });
            }
        }
        if !filled.starts_with('-') {
            return Err(LaunchError::Config {
                file: file.into(),
                reason: format!("line {}: does not start with an option", n + 1),
            });
        }
        match filled.split_once(' ') {
            Some((opt, val)) => {
                out.push(opt.to_string());
                out.push(val.trim().to_string());
            }
            None => out.push(filled),
        }
    }
    Ok(out)
}

fn read_config(dir: &Option<PathBuf>, name: &str, builtin: &str) -> Result<String, LaunchError> {
    match dir {
        None => Ok(builtin.to_string()),
        Some(d) => {
            std::fs::read_to_string(d.join(name)).map_err(|source| LaunchError::ConfigRead {
                file: d.join(name),
                source,
            })
        }
    }
}

/// The QEMU command line for `spec`.
pub fn qemu_args(spec: &VmSpec, paths: &RunPaths) -> Result<Vec<String>, LaunchError> {
    let p = |p: &Path| p.display().to_string();
    let vars = [
        ("name", spec.name.clone()),
        ("accel", spec.accel.clone()),
        ("mem_mib", spec.mem_mib.to_string()),
        ("vhost_socket", p(&paths.vhost_socket)),
        ("qmp_socket", p(&paths.qmp_socket)),
        ("serial_log", p(&paths.serial_log)),
        ("qemu_pid", p(&paths.qemu_pid)),
        ("mac", spec.mac.clone()),
        ("kernel", p(&spec.image.kernel)),
        ("initrd", p(&spec.image.initrd)),
        ("guest_args", spec.guest_args.clone()),
    ];
    let mut args = parse_args(
        "vm.args",
        &read_config(&spec.config_dir, "vm.args", VM_ARGS)?,
        &vars,
    )?;
    let (nic_file, nic_builtin) = match spec.nic {
        Nic::VhostUser => ("vhost-user-nic.args", VHOST_USER_NIC_ARGS),
        Nic::Plain => ("plain-nic.args", PLAIN_NIC_ARGS),
    };
    args.extend(parse_args(
        nic_file,
        &read_config(&spec.config_dir, nic_file, nic_builtin)?,
        &vars,
    )?);
    args.extend(parse_args(
        "test-guest.args",
        &read_config(&spec.config_dir, "test-guest.args", TEST_GUEST_ARGS)?,
        &vars,
    )?);
    if let Some(slot) = &spec.passthrough {
        args.extend(parse_args(
            "passthrough-port.args",
            &read_config(
                &spec.config_dir,
                "passthrough-port.args",
                PASSTHROUGH_PORT_ARGS,
            )?,
            &[("vf_port", PASSTHROUGH_PORT.into())],
        )?);
        if let Some(device) = &slot.device {
            args.extend(["-device".to_string(), device.clone()]);
        }
    }
    if let Some(nic) = &spec.ip_nic {
        args.extend(parse_args(
            "ip-nic.args",
            &read_config(&spec.config_dir, "ip-nic.args", IP_NIC_ARGS)?,
            &[
                ("ip_mac", nic.mac.clone()),
                ("ip_group", nic.group.to_string()),
                ("ip_local", nic.local.to_string()),
            ],
        )?);
    }
    if spec.role == Role::Destination {
        args.extend(parse_args(
            "destination.args",
            &read_config(&spec.config_dir, "destination.args", DESTINATION_ARGS)?,
            &vars,
        )?);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::launch::{mac_for, GuestImage};

    fn spec(role: Role) -> VmSpec {
        VmSpec {
            name: "vm1".into(),
            run_dir: "/run/x".into(),
            mem_mib: 512,
            role,
            accel: "tcg".into(),
            image: GuestImage {
                kernel: "/k".into(),
                initrd: "/i".into(),
            },
            vfmig_bin: "vfmig".into(),
            qemu_bin: "qemu-system-x86_64".into(),
            config_dir: None,
            mac: mac_for("vm1"),
            nic: Nic::VhostUser,
            netns: None,
            fabric: None,
            guest_args: String::new(),
            passthrough: None,
            ip_nic: None,
        }
    }

    #[test]
    fn the_shipped_option_files_give_the_vhost_user_wiring() {
        let s = spec(Role::Source);
        let args = qemu_args(&s, &RunPaths::under(&s.run_dir)).unwrap();
        let joined = args.join(" ");
        assert!(joined.contains("-object memory-backend-memfd,id=ram,size=512M,share=on"));
        assert!(joined.contains("-chardev socket,id=vfmig-vhost,path=/run/x/vhost-user.sock"));
        assert!(joined.contains("-append console=ttyS0 memmap=16M$0x18000000"));
        assert!(!args.contains(&"-incoming".to_string()));
        let d = spec(Role::Destination);
        let args = qemu_args(&d, &RunPaths::under(&d.run_dir)).unwrap();
        let i = args.iter().position(|a| a == "-incoming").unwrap();
        assert_eq!(args[i + 1], "defer");
        assert!(args.contains(&"-S".to_string()));
        let mut p = spec(Role::Source);
        p.nic = Nic::Plain;
        let joined = qemu_args(&p, &RunPaths::under(&p.run_dir))
            .unwrap()
            .join(" ");
        assert!(!joined.contains("vhost-user"));
        assert!(joined.contains("-device virtio-net-pci,id=vfmig-nic"));
        assert!(
            joined.contains("share=on"),
            "same RAM backend as with the companion"
        );
    }

    #[test]
    fn an_ip_nic_comes_after_the_companions_nic_on_its_multicast_segment() {
        let mut s = spec(Role::Destination);
        s.ip_nic = Some(crate::orchestrator::launch::IpNic {
            mac: "52:54:00:aa:bb:cc".into(),
            group: "230.78.1.2:7001".parse().unwrap(),
            local: "10.77.20.2".parse().unwrap(),
        });
        let args = qemu_args(&s, &RunPaths::under(&s.run_dir)).unwrap();
        let joined = args.join(" ");
        assert!(joined
            .contains("-netdev socket,id=vfmig-ip,mcast=230.78.1.2:7001,localaddr=10.77.20.2"));
        assert!(joined.contains(
            "-device virtio-net-pci,netdev=vfmig-ip,id=vfmig-ip-nic,mac=52:54:00:aa:bb:cc"
        ));
        // eth0 stays the companion's NIC: the IP NIC is enumerated after it.
        let nic = |id: &str| args.iter().position(|a| a.contains(id)).unwrap();
        assert!(nic("id=vfmig-nic") < nic("id=vfmig-ip-nic"));
        s.ip_nic = None;
        let joined = qemu_args(&s, &RunPaths::under(&s.run_dir))
            .unwrap()
            .join(" ");
        assert!(!joined.contains("vfmig-ip"));
    }

    #[test]
    fn unknown_placeholders_and_bare_values_are_refused() {
        assert!(matches!(
            parse_args("f", "-name {nope}", &[]),
            Err(LaunchError::Config { .. })
        ));
        assert!(matches!(
            parse_args("f", "name-without-dash", &[]),
            Err(LaunchError::Config { .. })
        ));
        assert_eq!(
            parse_args("f", "# c\n-a b c\n-S\n", &[]).unwrap(),
            vec!["-a", "b c", "-S"]
        );
    }
}
