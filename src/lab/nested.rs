//! The nested VFIO test: a real VF, bound to vfio-pci, inside an L1 guest under TCG.
//!
//! This machine has no SR-IOV hardware and no IOMMU, so the closest real thing is nested: QEMU
//! emulates an Intel IOMMU (`intel-iommu`) and an SR-IOV NIC (`igb`), the L1 guest runs Debian's
//! generic kernel with `intel_iommu=on`, creates two VFs through `sriov_numvfs`, binds the first
//! to vfio-pci and runs `vfmig vf self-test` on it (`tools/l1-init.sh`). That is the same kernel
//! interface, ioctl for ioctl, as on a real host.
//!
//! The L1 initramfs is built by `tools/setup.sh` without vfmig; [`run`] appends the static vfmig
//! binary as a second cpio archive, so the test always runs the vfmig it was built from.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::orchestrator::launch::parse_args;

const NESTED_L1_ARGS: &str = include_str!("../../qemu-patches-free-config/nested-l1.args");

/// Why the nested test could not run or did not pass.
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// A file the test needs is missing.
    #[error("{what} {path} is missing: {fix}")]
    Missing {
        /// What the file is.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        fix: &'static str,
    },
    /// The vfmig binary given is dynamically linked: it cannot run in the busybox initramfs.
    #[error(
        "{0} is dynamically linked; the L1 initramfs has no C library. Build the static one with \
         `bash tools/build-static.sh` and pass it with --vfmig"
    )]
    NotStatic(PathBuf),
    /// Files or QEMU could not be handled.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The option file is malformed.
    #[error(transparent)]
    Config(#[from] crate::orchestrator::launch::LaunchError),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> NestedError {
    let context = context.into();
    move |source| NestedError::Io { context, source }
}

/// What the nested test runs on.
#[derive(Debug, Clone)]
pub struct NestedOptions {
    /// Debian's generic (`-amd64`) kernel.
    pub kernel: PathBuf,
    /// The L1 initramfs built by `tools/setup.sh` (busybox, igb, vfio-pci, /init).
    pub initrd: PathBuf,
    /// The statically linked vfmig to run inside L1.
    pub vfmig: PathBuf,
    /// L1's RAM in MiB.
    pub mem_mib: u64,
    /// Give up (and fail) after this long.
    pub timeout: Duration,
    /// Where the combined initramfs and the console log are written.
    pub work_dir: PathBuf,
    /// Print L1's console lines as they come (steps are always printed).
    pub verbose: bool,
}

impl NestedOptions {
    /// The defaults: the kernel and initramfs that `tools/setup.sh` made, and the static vfmig
    /// that `tools/build-static.sh` built beside this binary's target directory.
    pub fn from_setup(work_dir: PathBuf) -> Self {
        let cache = std::env::var_os("VFMIG_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache"));
        Self {
            kernel: cache.join("kernel-generic/vmlinuz"),
            initrd: cache.join("l1-initramfs.cpio.gz"),
            vfmig: default_static_vfmig(),
            mem_mib: 512,
            timeout: Duration::from_secs(180),
            work_dir,
            verbose: false,
        }
    }
}

/// Where `tools/build-static.sh` puts the static vfmig: `target/static/x86_64-unknown-linux-gnu/
/// release/vfmig` of the source tree, or `$VFMIG_STATIC_BIN`.
pub fn default_static_vfmig() -> PathBuf {
    std::env::var_os("VFMIG_STATIC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/static/x86_64-unknown-linux-gnu/release/vfmig")
        })
}

/// The outcome: every step by name, in order, with `ok` or what went wrong.
#[derive(Debug, Clone)]
pub struct NestedReport {
    /// Steps in the order they ran: L1's own (`boot`, `create_vfs`, `bind_vfio_pci`), then the
    /// self-test's.
    pub steps: Vec<(String, String)>,
    /// The VF's dirty-tracking mode, as the self-test found it.
    pub dirty_tracking: Option<String>,
    /// The VF's address inside L1.
    pub bdf: Option<String>,
    /// What `vfmig vf check --json` said of the VF.
    pub check: Option<Value>,
    /// From starting QEMU to L1 powering off.
    pub elapsed: Duration,
    /// Whether every step passed.
    pub ok: bool,
    /// Why it failed, when it did and no step says so.
    pub error: Option<String>,
}

impl NestedReport {
    /// The JSON object of the last line of `vfmig vf nested-test`.
    pub fn to_json(&self) -> Value {
        let mut steps = Map::new();
        for (k, v) in &self.steps {
            steps.insert(k.clone(), Value::String(v.clone()));
        }
        let mut out = json!({
            "steps": steps,
            "dirty_tracking": self.dirty_tracking.clone().unwrap_or_else(|| "unknown".into()),
            "ok": self.ok,
            "elapsed_s": (self.elapsed.as_secs_f64() * 10.0).round() / 10.0,
        });
        if let Some(b) = &self.bdf {
            out["bdf"] = json!(b);
        }
        if let Some(c) = &self.check {
            out["check"] = c.clone();
        }
        if let Some(e) = &self.error {
            out["error"] = json!(e);
        }
        out
    }
}

/// One line of L1's console, as the test understands it.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// `vfmig-l1: step NAME: RESULT` (from /init).
    L1Step(String, String),
    /// `step NAME: RESULT` (from `vfmig vf self-test`).
    SelfTestStep(String, String),
    /// The self-test's JSON result.
    Result(Value),
    /// `vfmig-l1: check-json {…}`: `vfmig vf check --json` on the VF.
    Check(Value),
    /// `vfmig-l1: done rc=N`.
    Done(i32),
    Other,
}

fn parse_line(line: &str) -> Line {
    let line = line.trim_end_matches('\r').trim();
    let step = |rest: &str| {
        rest.split_once(": ")
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
    };
    if let Some(rest) = line.strip_prefix("vfmig-l1: step ") {
        if let Some((k, v)) = step(rest) {
            return Line::L1Step(k, v);
        }
    }
    if let Some(rest) = line.strip_prefix("vfmig-l1: check-json ") {
        return Line::Check(serde_json::from_str(rest).unwrap_or(Value::Null));
    }
    if let Some(rest) = line.strip_prefix("vfmig-l1: done rc=") {
        return Line::Done(rest.trim().parse().unwrap_or(-1));
    }
    if let Some(rest) = line.strip_prefix("step ") {
        if let Some((k, v)) = step(rest) {
            return Line::SelfTestStep(k, v);
        }
    }
    if line.starts_with('{') {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            if v.get("steps").is_some() {
                return Line::Result(v);
            }
        }
    }
    Line::Other
}

/// The `check` step's result from `vfmig vf check --json`: ok with what matters, or the
/// problems it found.
fn check_verdict(v: &Value) -> String {
    if v["ok"] == true {
        format!(
            "ok (driver {}, IOMMU group {}, {} regions, reset {}, FLR {}, dirty tracking {})",
            v["driver"].as_str().unwrap_or("?"),
            v["iommu_group"],
            v["regions"].as_array().map_or(0, Vec::len),
            if v["reset_supported"] == true {
                "supported"
            } else {
                "unsupported"
            },
            if v["flr_advertised"] == true {
                "advertised"
            } else {
                "not advertised"
            },
            v["dirty_tracking"].as_str().unwrap_or("?"),
        )
    } else if v.is_null() {
        "error: `vfmig vf check --json` printed no JSON".into()
    } else {
        let problems: Vec<&str> = v["problems"]
            .as_array()
            .map(|p| p.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        format!("error: {}", problems.join("; "))
    }
}

/// Is `data` a statically linked 64-bit ELF (no program interpreter)?
fn is_static_elf(data: &[u8]) -> bool {
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap_or([0; 4]));
    let phoff = u64::from_le_bytes(data[32..40].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > data.len() {
            break;
        }
        const PT_INTERP: u32 = 3;
        if u32_at(o) == PT_INTERP {
            return false;
        }
    }
    true
}

/// A `newc` cpio archive holding the given files (path inside the archive, mode, contents).
fn cpio_newc(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(&mut out, i as u32 + 1, name, *mode, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// Boots L1, streams its steps through `on_step` as they finish, and returns the report.
pub fn run(
    opts: &NestedOptions,
    on_step: &mut dyn FnMut(&str, &str),
) -> Result<NestedReport, NestedError> {
    let vfmig = read_static_vfmig(opts)?;
    std::fs::create_dir_all(&opts.work_dir)
        .map_err(io(format!("creating {}", opts.work_dir.display())))?;
    let initrd_path = write_initrd(opts, &vfmig)?;
    let p = |p: &Path| p.display().to_string();
    let args = parse_args(
        "nested-l1.args",
        NESTED_L1_ARGS,
        &[
            ("mem_mib", opts.mem_mib.to_string()),
            ("kernel", p(&opts.kernel)),
            ("initrd", p(&initrd_path)),
        ],
    )?;
    let console_path = opts.work_dir.join("l1-console.log");
    let mut console = std::fs::File::create(&console_path)
        .map_err(io(format!("creating {}", console_path.display())))?;
    tracing::info!(kernel = %opts.kernel.display(), "booting the L1 guest under TCG");
    let start = Instant::now();
    let mut l1 = L1::start(&args)?;
    let mut watch = Watch::new(on_step);
    loop {
        let left = opts.timeout.saturating_sub(start.elapsed());
        match l1.lines.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                let _ = writeln!(console, "{line}");
                if opts.verbose {
                    eprintln!("l1| {line}");
                }
                watch.line(&line, start);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                watch.report.error = Some(format!(
                    "L1 did not finish within {:?}; its console is in {}",
                    opts.timeout,
                    console_path.display()
                ));
                let _ = l1.child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    l1.wait();
    Ok(watch.finish(start.elapsed(), &console_path))
}

/// Checks that the kernel, the L1 initramfs and the static vfmig are there, and reads vfmig.
fn read_static_vfmig(opts: &NestedOptions) -> Result<Vec<u8>, NestedError> {
    for (what, path, fix) in [
        (
            "the generic guest kernel",
            &opts.kernel,
            "run `bash tools/setup.sh` (as root) first",
        ),
        (
            "the L1 initramfs",
            &opts.initrd,
            "run `bash tools/setup.sh` (as root) first",
        ),
        (
            "the static vfmig binary",
            &opts.vfmig,
            "run `bash tools/build-static.sh` first, or pass --vfmig",
        ),
    ] {
        if !path.exists() {
            return Err(NestedError::Missing {
                what,
                path: path.clone(),
                fix,
            });
        }
    }
    let vfmig =
        std::fs::read(&opts.vfmig).map_err(io(format!("reading {}", opts.vfmig.display())))?;
    if !is_static_elf(&vfmig) {
        return Err(NestedError::NotStatic(opts.vfmig.clone()));
    }
    Ok(vfmig)
}

/// Writes the L1 initramfs with `vfmig` in it to the work directory: the base archive (gzip),
/// zero-padded to 4 bytes, then a cpio archive with /bin/vfmig (the kernel unpacks
/// concatenated archives in order).
fn write_initrd(opts: &NestedOptions, vfmig: &[u8]) -> Result<PathBuf, NestedError> {
    let mut initrd =
        std::fs::read(&opts.initrd).map_err(io(format!("reading {}", opts.initrd.display())))?;
    while initrd.len() % 4 != 0 {
        initrd.push(0);
    }
    initrd.extend(cpio_newc(&[("bin/vfmig", 0o100755, vfmig)]));
    let initrd_path = opts.work_dir.join("l1-initramfs-with-vfmig.cpio");
    std::fs::write(&initrd_path, &initrd)
        .map_err(io(format!("writing {}", initrd_path.display())))?;
    Ok(initrd_path)
}

/// The L1 guest's QEMU, its stdout and stderr read line by line into `lines` (stderr's
/// prefixed with `qemu: `).
struct L1 {
    child: Child,
    lines: mpsc::Receiver<String>,
    readers: [JoinHandle<()>; 2],
}

impl L1 {
    fn start(args: &[String]) -> Result<Self, NestedError> {
        let mut child = Command::new("qemu-system-x86_64")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(
                "starting qemu-system-x86_64 (run `bash tools/setup.sh` to install it)",
            ))?;
        let (tx, lines) = mpsc::channel::<String>();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let tx2 = tx.clone();
        let readers = [
            std::thread::spawn(move || {
                if let Some(s) = stdout {
                    for line in BufReader::new(s).lines().map_while(Result::ok) {
                        let _ = tx.send(line);
                    }
                }
            }),
            std::thread::spawn(move || {
                if let Some(s) = stderr {
                    for line in BufReader::new(s).lines().map_while(Result::ok) {
                        let _ = tx2.send(format!("qemu: {line}"));
                    }
                }
            }),
        ];
        Ok(L1 {
            child,
            lines,
            readers,
        })
    }

    /// Waits for QEMU to exit and for its output to be read.
    fn wait(mut self) {
        let _ = self.child.wait();
        for r in self.readers {
            let _ = r.join();
        }
    }
}

/// What L1's console has told so far.
struct Watch<'a> {
    on_step: &'a mut dyn FnMut(&str, &str),
    report: NestedReport,
    booted: bool,
    result: Option<Value>,
    done_rc: Option<i32>,
}

impl<'a> Watch<'a> {
    fn new(on_step: &'a mut dyn FnMut(&str, &str)) -> Self {
        Watch {
            on_step,
            report: NestedReport {
                steps: Vec::new(),
                dirty_tracking: None,
                bdf: None,
                check: None,
                elapsed: Duration::ZERO,
                ok: false,
                error: None,
            },
            booted: false,
            result: None,
            done_rc: None,
        }
    }

    fn record(&mut self, k: String, v: String) {
        (self.on_step)(&k, &v);
        self.report.steps.push((k, v));
    }

    /// Takes in one console line; the first step or `done` line means L1 booted.
    fn line(&mut self, line: &str, start: Instant) {
        let parsed = parse_line(line);
        if !self.booted && matches!(parsed, Line::L1Step(..) | Line::Done(_)) {
            self.booted = true;
            let secs = start.elapsed().as_secs_f64();
            self.record("boot".into(), format!("ok ({secs:.1} s)"));
        }
        match parsed {
            Line::L1Step(k, v) | Line::SelfTestStep(k, v) => self.record(k, v),
            Line::Result(v) => self.result = Some(v),
            Line::Check(v) => {
                let verdict = check_verdict(&v);
                self.report.check = Some(v);
                self.record("check".into(), verdict);
            }
            Line::Done(rc) => self.done_rc = Some(rc),
            Line::Other => {}
        }
    }

    /// The report once L1 is gone: the self-test's own result is authoritative for its steps
    /// (any L1 step before it is kept).
    fn finish(mut self, elapsed: Duration, console_path: &Path) -> NestedReport {
        self.report.elapsed = elapsed;
        if !self.booted {
            self.record(
                "boot".into(),
                format!(
                    "error: L1 printed no step; its console is in {}",
                    console_path.display()
                ),
            );
        }
        let mut report = self.report;
        if let Some(v) = &self.result {
            report.dirty_tracking = v
                .get("dirty_tracking")
                .and_then(Value::as_str)
                .map(String::from);
            report.bdf = v.get("bdf").and_then(Value::as_str).map(String::from);
            if let Some(steps) = v.get("steps").and_then(Value::as_object) {
                for (k, val) in steps {
                    let val = val.as_str().unwrap_or("(not a string)").to_string();
                    match report.steps.iter_mut().find(|(name, _)| name == k) {
                        Some(s) => s.1 = val,
                        None => report.steps.push((k.clone(), val)),
                    }
                }
            }
        } else if report.error.is_none() && self.booted {
            report.error = Some(format!(
                "the self-test printed no result (L1 exit code {}); its console is in {}",
                self.done_rc.map_or("unknown".into(), |rc| rc.to_string()),
                console_path.display()
            ));
        }
        report.ok = self.result.is_some()
            && self.done_rc == Some(0)
            && report.steps.iter().all(|(_, v)| v.starts_with("ok"));
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_are_parsed() {
        assert_eq!(
            parse_line("vfmig-l1: step create_vfs: ok (2 VFs)\r"),
            Line::L1Step("create_vfs".into(), "ok (2 VFs)".into())
        );
        assert_eq!(
            parse_line("step open: error: no such device: x"),
            Line::SelfTestStep("open".into(), "error: no such device: x".into())
        );
        assert_eq!(parse_line("vfmig-l1: done rc=3"), Line::Done(3));
        assert!(matches!(
            parse_line(r#"{"steps":{"open":"ok"},"dirty_tracking":"x"}"#),
            Line::Result(_)
        ));
        assert_eq!(parse_line(r#"{"other":1}"#), Line::Other);
        assert!(matches!(
            parse_line(r#"vfmig-l1: check-json {"ok":true}"#),
            Line::Check(v) if v["ok"] == true
        ));
        assert_eq!(parse_line("[    1.0] igb 0000:01:00.0: ..."), Line::Other);
    }

    #[test]
    fn cpio_is_newc_and_aligned() {
        let a = cpio_newc(&[("bin/x", 0o100755, b"hello")]);
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        // header (110) + "bin/x\0" padded to 116, data 5 padded to 8
        assert_eq!(&a[116..121], b"hello");
        let trailer = &a[124..];
        assert_eq!(&trailer[..6], b"070701");
        assert!(std::str::from_utf8(&trailer[110..120]).unwrap() == "TRAILER!!!");
    }

    #[test]
    fn the_test_binary_itself_is_not_static() {
        // The test harness is a normal, dynamically linked executable: the check must say so,
        // and it must accept a file without a program interpreter.
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&std::fs::read(me).unwrap()));
        let mut fake = vec![0u8; 64];
        fake[..4].copy_from_slice(b"\x7fELF");
        fake[4] = 2;
        assert!(is_static_elf(&fake));
    }

    #[test]
    fn the_check_step_says_what_check_found() {
        let good = json!({"ok": true, "driver": "vfio-pci", "iommu_group": 4,
            "regions": [{}, {}], "reset_supported": true, "flr_advertised": true,
            "dirty_tracking": "all-writable-pages"});
        let v = check_verdict(&good);
        assert!(
            v.starts_with("ok (driver vfio-pci, IOMMU group 4, 2 regions"),
            "{v}"
        );
        let bad = json!({"ok": false, "problems": ["bound to igbvf", "no IOMMU"]});
        assert_eq!(check_verdict(&bad), "error: bound to igbvf; no IOMMU");
        assert!(check_verdict(&Value::Null).starts_with("error"));
    }

    #[test]
    fn report_json_names_every_step() {
        let r = NestedReport {
            steps: vec![
                ("boot".into(), "ok (5.0 s)".into()),
                ("open".into(), "error: x".into()),
            ],
            dirty_tracking: Some("all-writable-pages".into()),
            bdf: Some("0000:01:10.0".into()),
            check: None,
            elapsed: Duration::from_millis(6100),
            ok: false,
            error: None,
        };
        let v = r.to_json();
        assert_eq!(v["steps"]["boot"], "ok (5.0 s)");
        assert_eq!(v["steps"]["open"], "error: x");
        assert_eq!(v["dirty_tracking"], "all-writable-pages");
        assert_eq!(v["ok"], false);
    }
}
