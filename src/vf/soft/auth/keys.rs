//! The fabric's keys: the job key, each VM's static key pair, their files (mode 0600) and
//! `vfmig keys generate`.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::super::cluster::ClusterMap;
use super::NOISE;

/// A 32-byte key.
pub type Key = [u8; 32];

/// Why the fabric's keys could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read or written.
    #[error("cannot access key file {}; check the path", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A key file others may read.
    #[error(
        "key file {} has mode {mode:o}, readable by others; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// A key is not 64 hex digits.
    #[error("{what} is not a key (64 hex digits); generate keys with `vfmig keys generate`")]
    Malformed {
        /// Which key.
        what: String,
    },
    /// The cluster file has no job key.
    #[error(
        "the cluster file names no job key; run `vfmig keys generate --cluster FILE --dir DIR`, \
         or start the companion with --insecure-fabric (benchmarks only)"
    )]
    NoJobKey,
    /// The cluster file has no public key for this VM, or it does not match the private key.
    #[error(
        "the cluster file's public key for VM {vm} is missing or is not the private key's; \
         give the companion the key file `vfmig keys generate` wrote for {vm}"
    )]
    WrongKey {
        /// The VM.
        vm: String,
    },
    /// The handshake's cryptography failed to set up.
    #[error("cannot set up the Noise handshake")]
    Noise(#[source] snow::Error),
}

/// What the fabric's authentication needs: the job key, this VM's key pair, every VM's public
/// key.
#[derive(Clone)]
pub struct FabricKeys {
    pub(super) job: Key,
    pub(super) private: Key,
    pub(super) public: Key,
    pub(super) peers: BTreeMap<String, Key>,
}

impl std::fmt::Debug for FabricKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricKeys")
            .field("public", &hex(&self.public))
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Whether and how the fabric authenticates.
#[derive(Debug, Clone)]
pub enum FabricAuth {
    /// Every link authenticated (see the module).
    Keys(Arc<FabricKeys>),
    /// No authentication: whoever reaches the port may write guest RAM. Benchmarks only.
    Insecure,
}

/// Lower-case hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A key from 64 hex digits.
pub fn parse_key(s: &str, what: &str) -> Result<Key, KeyError> {
    let s = s.trim();
    let bad = || KeyError::Malformed { what: what.into() };
    if s.len() != 64 || !s.is_ascii() {
        return Err(bad());
    }
    let mut k = [0u8; 32];
    for (i, out) in k.iter_mut().enumerate() {
        *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(k)
}

/// Reads a key file, refusing one that group or others may access.
pub fn read_key_file(path: &Path) -> Result<Key, KeyError> {
    let io = |source| KeyError::Io {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::error!(path = %path.display(), mode = format!("{mode:o}"), "key file readable by others: refused");
        return Err(KeyError::Permissions {
            path: path.into(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    parse_key(&text, &format!("key file {}", path.display()))
}

/// Writes a key file of mode 0600 (created so; never readable by others in between).
pub fn write_key_file(path: &Path, key: &Key) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeyError::Io {
        path: path.into(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    writeln!(f, "{}", hex(key)).map_err(io)
}

/// A fresh static key pair: (private, public).
pub fn generate_keypair() -> Result<(Key, Key), KeyError> {
    let kp = snow::Builder::new(NOISE.parse().map_err(KeyError::Noise)?)
        .generate_keypair()
        .map_err(KeyError::Noise)?;
    let mut private = [0u8; 32];
    let mut public = [0u8; 32];
    private.copy_from_slice(&kp.private);
    public.copy_from_slice(&kp.public);
    Ok((private, public))
}

/// The public key of a private key.
pub fn public_of(private: &Key) -> Key {
    use snow::resolvers::CryptoResolver;
    let mut dh = snow::resolvers::DefaultResolver
        .resolve_dh(&snow::params::DHChoice::Curve25519)
        .expect("the default resolver has X25519");
    dh.set(private);
    let mut public = [0u8; 32];
    public.copy_from_slice(dh.pubkey());
    public
}

/// 32 random bytes.
pub fn random_key() -> Key {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).expect("the OS random source");
    k
}

impl FabricKeys {
    /// The keys of VM `vm`: its private key from `private_key_file` (mode 0600), the job key
    /// and every VM's public key from the cluster file.
    pub fn load(cluster: &ClusterMap, vm: &str, private_key_file: &Path) -> Result<Self, KeyError> {
        let private = read_key_file(private_key_file)?;
        let job = match (&cluster.job_key, &cluster.job_key_file) {
            (Some(k), _) => parse_key(k, "the cluster file's job_key")?,
            (None, Some(f)) => read_key_file(f)?,
            (None, None) => return Err(KeyError::NoJobKey),
        };
        Self::new(job, private, cluster, vm)
    }

    /// The keys from their values.
    pub fn new(job: Key, private: Key, cluster: &ClusterMap, vm: &str) -> Result<Self, KeyError> {
        let public = public_of(&private);
        let mut peers = BTreeMap::new();
        for (name, k) in &cluster.keys {
            peers.insert(
                name.clone(),
                parse_key(k, &format!("the cluster file's public key of {name}"))?,
            );
        }
        if peers.get(vm) != Some(&public) {
            return Err(KeyError::WrongKey { vm: vm.into() });
        }
        Ok(Self {
            job,
            private,
            public,
            peers,
        })
    }

    /// Whether `vm` has a public key in the cluster file.
    #[cfg(test)]
    pub(super) fn knows(&self, vm: &str) -> bool {
        self.peers.contains_key(vm)
    }
}

/// A fresh job in memory: a job key and a key pair per VM, and each VM's [`FabricAuth`]
/// (benchmarks; nothing is written).
pub fn ephemeral_job(vms: &[&str]) -> Result<BTreeMap<String, FabricAuth>, KeyError> {
    let job = random_key();
    let mut cluster = ClusterMap::default();
    let mut private = BTreeMap::new();
    for vm in vms {
        let (k, p) = generate_keypair()?;
        cluster.keys.insert((*vm).into(), hex(&p));
        private.insert(vm.to_string(), k);
    }
    private
        .into_iter()
        .map(|(vm, k)| {
            let keys = FabricKeys::new(job, k, &cluster, &vm)?;
            Ok((vm, FabricAuth::Keys(Arc::new(keys))))
        })
        .collect()
}

/// What `vfmig keys generate` wrote.
#[derive(Debug)]
pub struct Generated {
    /// The job key file.
    pub job_key_file: PathBuf,
    /// Each VM's private key file.
    pub private_keys: BTreeMap<String, PathBuf>,
}

/// Writes the job key and each VM's key pair into `dir` (files of mode 0600), and the public
/// keys and the job key file's path into the cluster file.
pub fn generate(cluster_file: &Path, dir: &Path) -> Result<Generated, KeyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, source }
    };
    let mut cluster = ClusterMap::load(cluster_file).map_err(|e| KeyError::Io {
        path: cluster_file.into(),
        source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    })?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let dir = std::fs::canonicalize(dir).map_err(io(dir))?;
    let job_key_file = dir.join("job.key");
    write_key_file(&job_key_file, &random_key())?;
    let mut private_keys = BTreeMap::new();
    let names: Vec<String> = cluster.vms.keys().cloned().collect();
    for name in names {
        let (private, public) = generate_keypair()?;
        let file = dir.join(format!("{name}.key"));
        write_key_file(&file, &private)?;
        cluster.keys.insert(name.clone(), hex(&public));
        private_keys.insert(name, file);
    }
    cluster.job_key = None;
    cluster.job_key_file = Some(job_key_file.clone());
    let text = serde_json::to_string_pretty(&cluster).unwrap_or_default();
    std::fs::write(cluster_file, text).map_err(io(cluster_file))?;
    Ok(Generated {
        job_key_file,
        private_keys,
    })
}

/// Names the unit tests' VMs may have.
#[cfg(test)]
const TEST_VMS: &[&str] = &["a", "b", "c", "d", "m", "dev", "vm", "x", "y"];

/// Keys for a unit test's VM (one of [`TEST_VMS`]): derived from the names, so VFs started at
/// different times know each other's public keys.
#[cfg(test)]
pub(crate) fn test_auth(vm: &str) -> FabricAuth {
    let private = |n: &str| blake3::derive_key("vfmig unit test static key", n.as_bytes());
    let mut c = ClusterMap::default();
    for n in TEST_VMS {
        c.keys.insert((*n).into(), hex(&public_of(&private(n))));
    }
    let job = blake3::derive_key("vfmig unit test job key", b"job");
    FabricAuth::Keys(Arc::new(
        FabricKeys::new(job, private(vm), &c, vm).expect("a test VM name"),
    ))
}
