//! Backups of the controller's store: one self-checking file.
//!
//! Layout (integers big-endian):
//!
//! ```text
//! "FLOTILLA-BACKUP\n"  format:u32  schema:u32  created_unix_ms:i64  version:str
//! ( 'T' name:str  ( 'E' key:bytes value:bytes )* )*     a tree and its entries
//! ( 'F' name:str  content:bytes )*                      files of the data dir
//! 'Z' sha256(every byte before the 'Z'):[u8; 32]
//! ```
//! where `str` and `bytes` are a u32 length and that many bytes. The state trees
//! are copied under the store's write gate, so nodes, alerts, deployments,
//! rollouts, approvals and the audit chain agree with each other; telemetry and
//! rollups (append-mostly and large) are optional and copied after.
//!
//! A restore checks the whole file's checksum before it writes anything, and
//! only into a data dir without a store.

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::keys;

/// The first bytes of every backup.
pub const MAGIC: &[u8] = b"FLOTILLA-BACKUP\n";
/// The layout revision this build writes and reads.
pub const FORMAT: u32 = 1;

/// Trees copied under the write gate: the controller's state.
pub const STATE_TREES: &[&str] = &[
    keys::META,
    keys::NODES,
    keys::AUDIT,
    keys::ALERTS,
    keys::ALERT_HISTORY,
    keys::SILENCES,
    keys::DEPLOYMENTS,
    keys::ROLLOUTS,
    keys::REVOKED_NODES,
    keys::JOIN_TOKENS,
    keys::APPROVALS,
];
/// Trees copied only on request, after the state: raw telemetry and rollups.
pub const TELEMETRY_TREES: &[&str] = &[keys::TELEMETRY, keys::ROLLUP_SERIES, keys::ROLLUPS, keys::ROLLUP_WATERMARKS];
/// Files of the data dir a backup carries: the command-signing key pair, which
/// the agents pin. A backup is therefore a secret (flotctl writes it 0600).
pub const DATA_FILES: &[&str] = &["command-signing.key", "command-signing.pub"];

/// Largest name, key and value a reader accepts: a bad file cannot make it allocate more.
const MAX_NAME: usize = 255;
const MAX_BYTES: usize = 256 * 1024 * 1024;

/// What a backup holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub format: u32,
    pub schema: u32,
    pub created_unix_ms: i64,
    pub controller_version: String,
    /// Entries per tree.
    pub records: BTreeMap<String, u64>,
    pub files: Vec<String>,
    /// SHA-256 (hex) of the body before the final record, and the file's size.
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a Flotilla backup (it does not start with FLOTILLA-BACKUP)")]
    NotABackup,
    #[error(
        "backup format {0} is newer than this controller reads ({FORMAT}): restore with a newer flotilla-controller"
    )]
    FormatTooNew(u32),
    #[error(
        "the backup's store schema {found} is newer than this controller understands ({supported}): restore with a newer flotilla-controller"
    )]
    SchemaTooNew { found: u32, supported: u32 },
    #[error("the backup is damaged at byte {at}: {reason}")]
    Damaged { at: u64, reason: String },
    #[error(
        "the backup's checksum does not match (stored {stored}, computed {computed}): the file is damaged or incomplete"
    )]
    Checksum { stored: String, computed: String },
    #[error(
        "{path} already holds a store: restore into an empty data dir, then point the controller at it (nothing was changed)"
    )]
    StoreExists { path: String },
    #[error("writing the restored store: {0}")]
    Store(#[from] sled::Error),
}

/// Writes a backup to `out`, hashing as it goes.
pub struct Writer<W: Write> {
    out: W,
    hash: Sha256,
    summary: Summary,
    tree: Option<String>,
}

impl<W: Write> std::fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("summary", &self.summary).finish_non_exhaustive()
    }
}

fn len32(n: usize) -> std::io::Result<[u8; 4]> {
    u32::try_from(n).map(u32::to_be_bytes).map_err(|_| std::io::Error::other("a field is longer than 4 GiB"))
}

impl<W: Write> Writer<W> {
    /// Starts a backup: writes the magic and the header.
    pub fn new(out: W, schema: u32, created_unix_ms: i64, controller_version: &str) -> std::io::Result<Self> {
        let summary = Summary {
            format: FORMAT,
            schema,
            created_unix_ms,
            controller_version: controller_version.to_owned(),
            ..Summary::default()
        };
        let mut writer = Self { out, hash: Sha256::new(), summary, tree: None };
        writer.put(MAGIC)?;
        writer.put(&FORMAT.to_be_bytes())?;
        writer.put(&schema.to_be_bytes())?;
        writer.put(&created_unix_ms.to_be_bytes())?;
        writer.field(controller_version.as_bytes())?;
        Ok(writer)
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hash.update(bytes);
        self.summary.bytes += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    fn field(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.put(&len32(bytes.len())?)?;
        self.put(bytes)
    }

    /// Starts tree `name`; entries that follow belong to it.
    pub fn tree(&mut self, name: &str) -> std::io::Result<()> {
        self.put(b"T")?;
        self.field(name.as_bytes())?;
        self.summary.records.insert(name.to_owned(), 0);
        self.tree = Some(name.to_owned());
        Ok(())
    }

    /// One key and value of the current tree.
    pub fn entry(&mut self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        let Some(tree) = self.tree.clone() else {
            return Err(std::io::Error::other("a backup entry before any tree"));
        };
        self.put(b"E")?;
        self.field(key)?;
        self.field(value)?;
        *self.summary.records.entry(tree).or_default() += 1;
        Ok(())
    }

    /// A file of the data dir.
    pub fn file(&mut self, name: &str, content: &[u8]) -> std::io::Result<()> {
        self.tree = None;
        self.put(b"F")?;
        self.field(name.as_bytes())?;
        self.field(content)?;
        self.summary.files.push(name.to_owned());
        Ok(())
    }

    /// Writes the checksum record; returns what was written and the sink.
    pub fn finish(mut self) -> std::io::Result<(Summary, W)> {
        let digest = std::mem::take(&mut self.hash).finalize();
        self.summary.sha256 = hex(&digest);
        self.out.write_all(b"Z")?;
        self.out.write_all(&digest)?;
        self.summary.bytes += 1 + digest.len() as u64;
        self.out.flush()?;
        Ok((self.summary, self.out))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a reader finds, in order.
enum Item {
    Tree(String),
    Entry(Vec<u8>, Vec<u8>),
    File(String, Vec<u8>),
}

/// Reads and checks a backup, hashing as it goes.
struct Reader<R: Read> {
    input: R,
    hash: Sha256,
    at: u64,
}

impl<R: Read> Reader<R> {
    fn damaged(&self, reason: impl Into<String>) -> BackupError {
        BackupError::Damaged { at: self.at, reason: reason.into() }
    }

    fn exact(&mut self, buf: &mut [u8], hashed: bool) -> Result<(), BackupError> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => self.damaged("it ends early (an interrupted download?)"),
            _ => self.damaged(e.to_string()),
        })?;
        if hashed {
            self.hash.update(&*buf);
        }
        self.at += buf.len() as u64;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, BackupError> {
        let mut b = [0u8; 4];
        self.exact(&mut b, true)?;
        Ok(u32::from_be_bytes(b))
    }

    fn bytes(&mut self, max: usize) -> Result<Vec<u8>, BackupError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(self.damaged(format!("a field of {n} bytes, more than the {max} allowed")));
        }
        let mut v = vec![0u8; n];
        self.exact(&mut v, true)?;
        Ok(v)
    }

    fn name(&mut self) -> Result<String, BackupError> {
        let raw = self.bytes(MAX_NAME)?;
        String::from_utf8(raw).map_err(|_| self.damaged("a name that is not UTF-8"))
    }

    /// The header, after checking the magic, format and schema.
    fn header(&mut self) -> Result<Summary, BackupError> {
        let mut magic = vec![0u8; MAGIC.len()];
        self.exact(&mut magic, true).map_err(|_| BackupError::NotABackup)?;
        if magic != MAGIC {
            return Err(BackupError::NotABackup);
        }
        let format = self.u32()?;
        if format > FORMAT {
            return Err(BackupError::FormatTooNew(format));
        }
        let schema = self.u32()?;
        if schema > super::SCHEMA_VERSION {
            return Err(BackupError::SchemaTooNew { found: schema, supported: super::SCHEMA_VERSION });
        }
        let mut created = [0u8; 8];
        self.exact(&mut created, true)?;
        let version = self.name()?;
        Ok(Summary {
            format,
            schema,
            created_unix_ms: i64::from_be_bytes(created),
            controller_version: version,
            ..Summary::default()
        })
    }

    /// The next item, or `None` after a correct checksum record.
    fn next(&mut self, in_tree: bool) -> Result<Option<Item>, BackupError> {
        let mut tag = [0u8; 1];
        self.exact(&mut tag, false)?;
        match tag[0] {
            b'T' | b'E' | b'F' => self.hash.update(tag),
            b'Z' => {
                let computed = hex(&std::mem::take(&mut self.hash).finalize());
                let mut stored = [0u8; 32];
                self.exact(&mut stored, false)?;
                let stored = hex(&stored);
                if stored != computed {
                    return Err(BackupError::Checksum { stored, computed });
                }
                let mut rest = [0u8; 1];
                if self.input.read(&mut rest).map_err(|e| self.damaged(e.to_string()))? != 0 {
                    return Err(self.damaged("bytes after the checksum record"));
                }
                return Ok(None);
            }
            other => return Err(self.damaged(format!("unknown record tag {other:#04x}"))),
        }
        Ok(Some(match tag[0] {
            b'T' => Item::Tree(self.name()?),
            b'E' if in_tree => Item::Entry(self.bytes(MAX_BYTES)?, self.bytes(MAX_BYTES)?),
            b'E' => return Err(self.damaged("an entry outside any tree")),
            _ => Item::File(self.name()?, self.bytes(MAX_BYTES)?),
        }))
    }
}

fn open(path: &Path) -> Result<Reader<BufReader<std::fs::File>>, BackupError> {
    let file =
        std::fs::File::open(path).map_err(|source| BackupError::Io { path: path.display().to_string(), source })?;
    Ok(Reader { input: BufReader::with_capacity(1 << 20, file), hash: Sha256::new(), at: 0 })
}

/// Reads the whole backup at `path`, checking its structure and checksum,
/// calling `each` per item; the summary once the checksum matched.
fn walk(path: &Path, mut each: impl FnMut(&Item) -> Result<(), BackupError>) -> Result<Summary, BackupError> {
    let mut reader = open(path)?;
    let mut summary = reader.header()?;
    let mut tree: Option<String> = None;
    while let Some(item) = reader.next(tree.is_some())? {
        match &item {
            Item::Tree(name) => {
                summary.records.insert(name.clone(), 0);
                tree = Some(name.clone());
            }
            Item::Entry(..) => {
                if let Some(t) = &tree {
                    *summary.records.entry(t.clone()).or_default() += 1;
                }
            }
            Item::File(name, _) => {
                if !DATA_FILES.contains(&name.as_str()) {
                    return Err(reader.damaged(format!("an unexpected file {name:?}")));
                }
                tree = None;
                summary.files.push(name.clone());
            }
        }
        each(&item)?;
    }
    summary.bytes = reader.at;
    Ok(summary)
}

/// Checks a backup without restoring it.
pub fn verify(path: &Path) -> Result<Summary, BackupError> {
    let mut summary = walk(path, |_| Ok(()))?;
    summary.sha256 = checksum_of(path)?;
    Ok(summary)
}

/// The stored checksum (the file's last 32 bytes), as hex.
fn checksum_of(path: &Path) -> Result<String, BackupError> {
    let io = |source| BackupError::Io { path: path.display().to_string(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut tail = [0u8; 32];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(len.saturating_sub(32))).map_err(io)?;
    file.read_exact(&mut tail).map_err(io)?;
    Ok(hex(&tail))
}

/// Rebuilds a store from the backup at `path` into `data_dir` (its `store`
/// subdirectory and the data files). Checks the whole file first; refuses a
/// data dir that already has a store.
pub fn restore(path: &Path, data_dir: &Path) -> Result<Summary, BackupError> {
    let summary = verify(path)?;
    let store_path = data_dir.join("store");
    let io = |p: &Path| {
        let shown = p.display().to_string();
        move |source| BackupError::Io { path: shown, source }
    };
    if std::fs::read_dir(&store_path).map(|mut d| d.next().is_some()).unwrap_or(false) {
        return Err(BackupError::StoreExists { path: store_path.display().to_string() });
    }
    for name in DATA_FILES {
        if data_dir.join(name).exists() {
            return Err(BackupError::StoreExists { path: data_dir.join(name).display().to_string() });
        }
    }
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let db = super::sled_config(&store_path, super::StoreOptions::default()).open()?;
    let mut tree: Option<sled::Tree> = None;
    let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    walk(path, |item| {
        match item {
            Item::Tree(name) => tree = Some(db.open_tree(name)?),
            Item::Entry(k, v) => {
                if let Some(t) = &tree {
                    t.insert(k.as_slice(), v.as_slice())?;
                }
            }
            Item::File(name, content) => files.push((data_dir.join(name), content.clone())),
        }
        Ok(())
    })?;
    db.flush()?;
    for (path, content) in files {
        write_private(&path, &content).map_err(io(&path))?;
    }
    Ok(summary)
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(content)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("b.flotbak");
        let file = std::fs::File::create(&path).unwrap();
        let mut w = Writer::new(file, 2, 1_700_000_000_000, "0.1.0").unwrap();
        w.tree(keys::META).unwrap();
        w.entry(keys::SCHEMA_VERSION_KEY, &2u32.to_be_bytes()).unwrap();
        w.tree(keys::NODES).unwrap();
        w.entry(b"gpu-a", b"record-a").unwrap();
        w.entry(b"gpu-b", b"record-b").unwrap();
        w.file("command-signing.pub", b"PUBLIC").unwrap();
        let (summary, _) = w.finish().unwrap();
        assert_eq!(summary.records.get(keys::NODES), Some(&2));
        path
    }

    #[test]
    fn a_backup_verifies_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let summary = verify(&path).unwrap();
        assert_eq!((summary.schema, summary.controller_version.as_str()), (2, "0.1.0"));
        assert_eq!(summary.records.get(keys::NODES), Some(&2));
        assert_eq!(summary.files, vec!["command-signing.pub".to_owned()]);
        let data = dir.path().join("data");
        restore(&path, &data).unwrap();
        let db = super::super::sled_config(&data.join("store"), super::super::StoreOptions::default()).open().unwrap();
        assert_eq!(db.open_tree(keys::NODES).unwrap().get(b"gpu-b").unwrap().unwrap().as_ref(), b"record-b");
        assert_eq!(std::fs::read(data.join("command-signing.pub")).unwrap(), b"PUBLIC");
        drop(db);
        assert!(matches!(restore(&path, &data), Err(BackupError::StoreExists { .. })), "never over a store");
    }

    #[test]
    fn every_flipped_or_missing_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x41;
            std::fs::write(&path, &bad).unwrap();
            assert!(verify(&path).is_err(), "flipping byte {i} went unnoticed");
        }
        for cut in [1, 10, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert!(verify(&path).is_err(), "a file cut at {cut} went unnoticed");
        }
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(verify(&path), Err(BackupError::NotABackup)));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.flotbak");
        let w = Writer::new(std::fs::File::create(&path).unwrap(), super::super::SCHEMA_VERSION + 1, 0, "9").unwrap();
        w.finish().unwrap();
        assert!(matches!(verify(&path), Err(BackupError::SchemaTooNew { .. })));
    }
}
