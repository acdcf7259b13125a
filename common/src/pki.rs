//! The fleet PKI: a CA, the controller's server certificate, and client
//! certificates for agents and operators, each carrying one identity URI.
//!
//! Layout of a PKI directory (what `flotctl ca init` writes):
//!
//! ```text
//! ca.pem  ca.key                     the fleet CA (keep ca.key offline in production)
//! controller.pem  controller.key     the controller's server certificate
//! nodes/<id>.pem  nodes/<id>.key     agent certificates (`flotctl cert issue --node`)
//! operators/<name>.pem  .key         operator certificates: `admin` (role admin) from
//!                                    `ca init`, others from `flotctl cert issue --user`
//! ```
//!
//! Agents that enroll with a join token get their certificate another way: the
//! controller, given `tls.ca_key`, signs their request ([`Authority`]).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::Identity;

mod authority;

pub use authority::{Authority, KeyAndRequest, MAX_CSR_BYTES, Signed, Validity};

/// Validity of the fleet CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default validity of leaf certificates issued by hand.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating of `not_before`, so that a host whose clock is a little behind
/// accepts a certificate issued a moment ago.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Default subject alternative names of the controller certificate.
pub const DEFAULT_CONTROLLER_SANS: [&str; 2] = ["localhost", "127.0.0.1"];

/// Errors of the PKI helpers; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; pass --force to overwrite it or choose another --dir")]
    Exists { path: PathBuf },
    #[error("{path}: not a usable CA file ({source}); is this the directory `flotctl ca init` wrote?")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("invalid subject alternative name {name:?}: {source}")]
    BadSan {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate request refused: {0}")]
    BadCsr(String),
    #[error("{key} is not the key of {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

/// Paths of one certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The files `flotctl ca init` writes.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub ca_cert: PathBuf,
    pub controller: CertPaths,
    pub admin: CertPaths,
}

/// What to put in the controller's server certificate.
#[derive(Debug, Clone)]
pub struct CaInit {
    /// DNS names and IP addresses the controller is reached at.
    pub controller_sans: Vec<String>,
    /// Name of the first operator (role admin).
    pub admin_name: String,
    /// Overwrite existing files.
    pub force: bool,
}

impl Default for CaInit {
    fn default() -> Self {
        Self {
            controller_sans: DEFAULT_CONTROLLER_SANS.iter().map(|s| (*s).to_owned()).collect(),
            admin_name: "admin".to_owned(),
            force: false,
        }
    }
}

/// Paths inside a PKI directory.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}
fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}
/// Where `cert issue` puts the certificate of `identity`.
pub fn leaf_paths(dir: &Path, identity: &Identity) -> CertPaths {
    let stem = match identity {
        Identity::Node(id) => dir.join("nodes").join(id.as_str()),
        Identity::Operator { name, .. } => dir.join("operators").join(sanitize(name)),
        Identity::Controller => dir.join("controller"),
    };
    CertPaths { cert: stem.with_extension("pem"), key: stem.with_extension("key") }
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Creates a new fleet CA, the controller certificate and an admin certificate in `dir`.
pub fn init_ca(dir: &Path, opts: &CaInit) -> Result<CaFiles, PkiError> {
    let ca_cert = ca_cert_path(dir);
    if !opts.force && (ca_cert.exists() || ca_key_path(dir).exists()) {
        return Err(PkiError::Exists { path: ca_cert });
    }
    let sans = opts.controller_sans.iter().map(|name| parse_san(name)).collect::<Result<Vec<_>, _>>()?;

    let ca_key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, format!("Flotilla fleet CA {:08x}", rand::random::<u32>()));
    params.distinguished_name.push(DnType::OrganizationName, "Flotilla");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, CA_VALIDITY);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&ca_key)?;

    write_file(dir, &ca_cert, cert.pem().as_bytes(), Secret::No)?;
    write_file(dir, &ca_key_path(dir), ca_key.serialize_pem().as_bytes(), Secret::Yes)?;

    let issuer = Issuer::new(params, ca_key);
    let controller = issue_with(dir, &issuer, &Identity::Controller, sans, LEAF_VALIDITY)?;
    let admin = issue_with(
        dir,
        &issuer,
        &Identity::Operator { name: opts.admin_name.clone(), role: crate::Role::Admin },
        Vec::new(),
        LEAF_VALIDITY,
    )?;
    Ok(CaFiles { ca_cert, controller, admin })
}

/// Issues a client certificate for `identity` with the CA in `dir`, writing it
/// where [`leaf_paths`] says. Refuses to overwrite unless `force`.
pub fn issue(dir: &Path, identity: &Identity, validity: Duration, force: bool) -> Result<CertPaths, PkiError> {
    let paths = leaf_paths(dir, identity);
    if !force && paths.cert.exists() {
        return Err(PkiError::Exists { path: paths.cert });
    }
    let issuer = load_issuer(dir)?;
    issue_with(dir, &issuer, identity, Vec::new(), validity)
}

/// Issues the controller's server certificate again with new names (e.g. after
/// moving the controller), keeping the CA.
pub fn issue_controller(dir: &Path, sans: &[String], validity: Duration) -> Result<CertPaths, PkiError> {
    let sans = sans.iter().map(|n| parse_san(n)).collect::<Result<Vec<_>, _>>()?;
    let issuer = load_issuer(dir)?;
    issue_with(dir, &issuer, &Identity::Controller, sans, validity)
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key_path = ca_key_path(dir);
    let key_pem = read(&key_path)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::BadCa { path: key_path.clone(), source })?;
    let cert_path = ca_cert_path(dir);
    let cert_pem = read(&cert_path)?;
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| PkiError::BadCa { path: cert_path, source })
}

fn issue_with(
    dir: &Path,
    issuer: &Issuer<'_, KeyPair>,
    identity: &Identity,
    sans: Vec<SanType>,
    validity: Duration,
) -> Result<CertPaths, PkiError> {
    let key = KeyPair::generate()?;
    let cert = leaf_params(identity, sans, validity)?.signed_by(&key, issuer)?;

    let paths = leaf_paths(dir, identity);
    write_file(dir, &paths.cert, cert.pem().as_bytes(), Secret::No)?;
    write_file(dir, &paths.key, key.serialize_pem().as_bytes(), Secret::Yes)?;
    Ok(paths)
}

/// The parameters of a leaf certificate for `identity`: its one identity URI,
/// server or client use (never both, never a CA), a fresh serial.
fn leaf_params(identity: &Identity, mut sans: Vec<SanType>, validity: Duration) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let common_name = match identity {
        Identity::Node(id) => id.to_string(),
        Identity::Operator { name, .. } => name.clone(),
        Identity::Controller => "flotilla-controller".to_owned(),
    };
    params.distinguished_name.push(DnType::CommonName, common_name);
    let uri = identity.to_uri();
    sans.push(SanType::URI(uri.clone().try_into().map_err(|source| PkiError::BadSan { name: uri, source })?));
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match identity {
        Identity::Controller => vec![ExtendedKeyUsagePurpose::ServerAuth],
        _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    set_validity(&mut params, validity);
    Ok(params)
}

fn parse_san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    name.to_owned()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|source| PkiError::BadSan { name: name.to_owned(), source })
}

/// Sets `not_before` a little in the past (a tenth of the validity, at most
/// [`CLOCK_SKEW`]: a certificate of 30 s must not be mostly backdating) and
/// `not_after` `validity` from now.
fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW.min(validity / 10);
    params.not_after = now + validity;
}

fn random_serial() -> SerialNumber {
    // 63 random bits, positive as RFC 5280 asks.
    SerialNumber::from(rand::random::<u64>() >> 1)
}

/// Writes a private key file atomically with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    write_file(dir, path, bytes, Secret::Yes).map_err(|e| match e {
        PkiError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    })
}

/// Writes a public file (a certificate) atomically with mode 0644.
pub fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    write_file(dir, path, bytes, Secret::No).map_err(|e| match e {
        PkiError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Secret {
    Yes,
    No,
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that a crash
/// never leaves half a key; private keys are created with mode 0600.
fn write_file(dir: &Path, path: &Path, bytes: &[u8], secret: Secret) -> Result<(), PkiError> {
    let io = |source| PkiError::Io { path: path.to_owned(), source };
    let parent = path.parent().unwrap_or(dir);
    fs::create_dir_all(parent).map_err(io)?;
    let tmp = path.with_extension("tmp");
    // A stale temporary file keeps its old mode when reopened: start afresh so
    // that a key is never written into a file others can read.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret == Secret::Yes { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeId;

    #[test]
    fn issued_certificates_carry_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(dir.path(), &CaInit::default()).unwrap();
        let node = Identity::Node(NodeId::new("gpu-1").unwrap());
        let paths = issue(dir.path(), &node, LEAF_VALIDITY, false).unwrap();
        for (path, want) in [
            (&paths.cert, node.clone()),
            (&files.controller.cert, Identity::Controller),
            (&files.admin.cert, Identity::Operator { name: "admin".into(), role: crate::Role::Admin }),
        ] {
            let pem = fs::read(path).unwrap();
            let der = crate::tls::certs_from_pem(path, &pem).unwrap();
            assert_eq!(Identity::from_der(&der[0]).unwrap(), want);
        }
        assert!(matches!(init_ca(dir.path(), &CaInit::default()), Err(PkiError::Exists { .. })));
        assert!(matches!(issue(dir.path(), &node, LEAF_VALIDITY, false), Err(PkiError::Exists { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let files = init_ca(dir.path(), &CaInit::default()).unwrap();
        let mode = fs::metadata(&files.admin.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A stale, world-readable temporary file does not lend its mode to a key.
        let key = dir.path().join("node.key");
        fs::write(key.with_extension("tmp"), b"stale").unwrap();
        fs::set_permissions(key.with_extension("tmp"), fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&key, b"secret").unwrap();
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
