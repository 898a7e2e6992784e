//! `vfmig-agent [--if eth0] [--cmdline /proc/cmdline] [--bin-dir /bin] [--no-open]`
//!
//! Run by the guest's init: opens the soft VF, prints `{"agent":"ready","mac":…}`, closes it,
//! then runs the workload the kernel command line names: `vfmig.run=NAME` and
//! `vfmig.args=a:b:c` (colon-separated, since the command line is space-separated), e.g.
//! `vfmig.run=lu-lite vfmig.args=--me:a:--peers:a,b,c:--n:256`. The workload replaces the
//! agent (exec of `/bin/NAME`). Without `vfmig.run` it prints ready and exits 0 (1 if the
//! device does not answer). If the device does not answer but `vfmig.run` is given, it prints
//! `{"agent":"no-device","error":…}` and still runs the workload (which may not need it, e.g.
//! `lu-lite --local`, or fails with its own message).

use std::os::unix::process::CommandExt;

use vfmig_guest::workload::{Args, Json};
use vfmig_guest::Device;

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    name: String,
    args: Vec<String>,
}

fn parse_cmdline(cmdline: &str) -> Result<Option<Run>, String> {
    let mut name = None;
    let mut args = Vec::new();
    for tok in cmdline.split_whitespace() {
        if let Some(v) = tok.strip_prefix("vfmig.run=") {
            name = Some(v.to_string());
        } else if let Some(v) = tok.strip_prefix("vfmig.args=") {
            args = v
                .split(':')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
        }
    }
    match name {
        None => Ok(None),
        Some(n)
            if n.is_empty()
                || n.contains('/')
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') =>
        {
            Err(format!("vfmig.run={n:?} is not a program name"))
        }
        Some(n) => Ok(Some(Run { name: n, args })),
    }
}

fn fail(msg: &str) -> ! {
    Json::new().s("agent", "error").s("error", msg).print();
    eprintln!("vfmig-agent: {msg}");
    std::process::exit(1)
}

fn main() {
    let a = Args::from_env().unwrap_or_else(|e| fail(&e));
    let ifname = a.str("if").unwrap_or("eth0");
    let cmdline_path = a.str("cmdline").unwrap_or("/proc/cmdline");
    let bin_dir = a.str("bin-dir").unwrap_or("/bin");
    let cmdline = std::fs::read_to_string(cmdline_path)
        .unwrap_or_else(|e| fail(&format!("cannot read {cmdline_path}: {e}")));
    let run = parse_cmdline(&cmdline).unwrap_or_else(|e| fail(&e));

    if a.flag("no-open") {
        Json::new().s("agent", "ready").s("mac", "").print();
    } else {
        // Open (and close again) so that a workload starts from a companion known to answer.
        match Device::open(ifname) {
            Ok(dev) => {
                Json::new()
                    .s("agent", "ready")
                    .s("mac", &dev.mac_string())
                    .s("if", ifname)
                    .print();
            }
            // Without a companion a workload may still run (`lu-lite --local`, a baseline).
            Err(e) if run.is_some() => {
                Json::new()
                    .s("agent", "no-device")
                    .s("error", &e.to_string())
                    .print();
            }
            Err(e) => fail(&e.to_string()),
        }
    }

    let Some(run) = run else {
        return;
    };
    let path = std::path::Path::new(bin_dir).join(&run.name);
    Json::new()
        .s("agent", "run")
        .s("program", &path.display().to_string())
        .s("args", &run.args.join(" "))
        .print();
    let e = std::process::Command::new(&path).args(&run.args).exec();
    fail(&format!("cannot run {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_parsing() {
        assert_eq!(
            parse_cmdline("console=ttyS0 memmap=16M$0x18000000 quiet\n").unwrap(),
            None
        );
        assert_eq!(
            parse_cmdline(
                "console=ttyS0 vfmig.run=lu-lite vfmig.args=--me:a:--peers:a,b,c:--n:256 quiet"
            )
            .unwrap(),
            Some(Run {
                name: "lu-lite".into(),
                args: ["--me", "a", "--peers", "a,b,c", "--n", "256"]
                    .map(String::from)
                    .to_vec()
            })
        );
        assert_eq!(
            parse_cmdline("vfmig.run=rdma-bw").unwrap().unwrap().args,
            Vec::<String>::new()
        );
        assert!(parse_cmdline("vfmig.run=../sh").is_err());
        assert!(parse_cmdline("vfmig.run=").is_err());
    }
}
