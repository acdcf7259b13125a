//! The agent's batch sequence counter, persisted so that seqs are never reused
//! across restarts (the controller de-duplicates by node and seq).
//!
//! Writing the counter on every batch would cost an fsync per batch; instead a
//! block of seqs is reserved on disk ahead of use ("hi-lo"): after a crash the
//! counter resumes past the reserved block, leaving a harmless gap.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const BLOCK: u64 = 1024;

/// A failure to read or persist the counter.
#[derive(Debug, thiserror::Error)]
#[error("sequence state {path}: {message}")]
pub struct SeqError {
    pub path: PathBuf,
    pub message: String,
}

/// Hands out strictly increasing seqs starting at 1.
#[derive(Debug)]
pub struct SeqAllocator {
    path: PathBuf,
    next: u64,
    reserved_until: u64,
    /// True when no state was found on disk (first start, or the state was lost).
    fresh: bool,
}

impl SeqAllocator {
    /// Opens the counter stored in `dir`.
    pub fn open(dir: &Path) -> Result<Self, SeqError> {
        let path = dir.join("uplink.seq");
        let err = |message: String| SeqError { path: path.clone(), message };
        fs::create_dir_all(dir).map_err(|e| err(format!("create {}: {e}", dir.display())))?;
        let (reserved, fresh) = match fs::read_to_string(&path) {
            Ok(text) => (
                text.trim().parse::<u64>().map_err(|e| err(format!("not a number ({e}); delete the file to reset")))?,
                false,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, true),
            Err(e) => return Err(err(e.to_string())),
        };
        let mut alloc = Self { path, next: reserved + 1, reserved_until: reserved, fresh };
        alloc.reserve()?;
        Ok(alloc)
    }

    /// Whether the counter started without stored state.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// The next seq.
    pub fn allocate(&mut self) -> Result<u64, SeqError> {
        if self.next > self.reserved_until {
            self.reserve()?;
        }
        let seq = self.next;
        self.next += 1;
        Ok(seq)
    }

    /// Moves the counter past `floor` (the controller already stored seqs up to it).
    pub fn skip_past(&mut self, floor: u64) -> Result<(), SeqError> {
        if self.next <= floor {
            self.next = floor + 1;
            self.reserve()?;
        }
        Ok(())
    }

    fn reserve(&mut self) -> Result<(), SeqError> {
        let until = self.next + BLOCK - 1;
        let err = |message: String| SeqError { path: self.path.clone(), message };
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
        f.write_all(format!("{until}\n").as_bytes()).map_err(|e| err(e.to_string()))?;
        f.sync_all().map_err(|e| err(e.to_string()))?;
        fs::rename(&tmp, &self.path).map_err(|e| err(e.to_string()))?;
        self.reserved_until = until;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_never_repeat_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = SeqAllocator::open(dir.path()).unwrap();
        assert!(a.fresh());
        let first: Vec<u64> = (0..2000).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(first[0], 1);
        assert!(first.windows(2).all(|w| w[0] < w[1]));
        drop(a);
        let mut b = SeqAllocator::open(dir.path()).unwrap();
        assert!(!b.fresh());
        assert!(b.allocate().unwrap() > *first.last().unwrap());
    }

    #[test]
    fn skip_past_moves_forward_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = SeqAllocator::open(dir.path()).unwrap();
        a.skip_past(5000).unwrap();
        assert_eq!(a.allocate().unwrap(), 5001);
        a.skip_past(10).unwrap();
        assert_eq!(a.allocate().unwrap(), 5002);
    }
}
