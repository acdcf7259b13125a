//! The agent's on-disk telemetry buffer: every unacknowledged batch is also
//! written here, so that batches survive agent restarts and long controller
//! outages, and are resent (with their original timestamps) until acked.
//!
//! Layout: `DATA_DIR/buffer/NNNNNNNNNNNNNNNNNNNN.seg`, append-only segment files
//! of records `[len: u32 LE][crc32: u32 LE][postcard TelemetryBatch]`. A segment
//! is deleted once every batch in it is acknowledged (or dropped). A torn record
//! at the end of a segment (the agent died mid-write) is cut off on load.
//!
//! Writes go to the page cache without an fsync per batch: a killed agent keeps
//! them; only a power loss can take the last seconds, which the controller never
//! acknowledged anyway. Segments are synced when they are closed.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use flotilla_common::model::TelemetryBatch;

/// Largest record accepted on load; anything bigger is corruption.
const MAX_RECORD: usize = 16 * 1024 * 1024;

/// A buffer failure, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("telemetry buffer {path}: {source}")]
pub struct BufferError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn err(path: &Path) -> impl FnOnce(io::Error) -> BufferError + '_ {
    move |source| BufferError { path: path.to_owned(), source }
}

#[derive(Debug)]
struct Segment {
    id: u64,
    path: PathBuf,
    bytes: u64,
    /// Seqs written here and not yet acknowledged or dropped.
    live: BTreeSet<u64>,
}

/// The bounded on-disk buffer.
#[derive(Debug)]
pub struct DiskBuffer {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    /// The segment being appended to (the last one), open.
    current: Option<File>,
    segment_bytes: u64,
    max_bytes: u64,
    total_bytes: u64,
}

impl DiskBuffer {
    /// Opens the buffer in `dir` and returns the batches it holds, oldest first.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Self, Vec<TelemetryBatch>), BufferError> {
        fs::create_dir_all(dir).map_err(err(dir))?;
        let mut ids: Vec<u64> = fs::read_dir(dir)
            .map_err(err(dir))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut segments = VecDeque::new();
        let mut batches = Vec::new();
        let mut total_bytes = 0;
        for id in ids {
            let path = segment_path(dir, id);
            let (loaded, valid_len) = read_segment(&path)?;
            let len = fs::metadata(&path).map_err(err(&path))?.len();
            if valid_len < len {
                tracing::warn!(path = %path.display(), kept = valid_len, "cutting a torn record off a buffer segment");
                OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(valid_len)).map_err(err(&path))?;
            }
            let live: BTreeSet<u64> = loaded.iter().map(|b| b.seq).collect();
            if live.is_empty() {
                fs::remove_file(&path).map_err(err(&path))?;
                continue;
            }
            total_bytes += valid_len;
            segments.push_back(Segment { id, path, bytes: valid_len, live });
            batches.extend(loaded);
        }
        batches.sort_by_key(|b| b.seq);
        batches.dedup_by_key(|b| b.seq);
        let buffer = Self {
            dir: dir.to_owned(),
            segments,
            current: None,
            segment_bytes: (max_bytes / 16).clamp(64 * 1024, 8 * 1024 * 1024),
            max_bytes,
            total_bytes,
        };
        Ok((buffer, batches))
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Writes `batch`. Returns the seqs dropped to stay within the bound (oldest
    /// segments first); the caller forgets them too and counts them.
    pub fn append(&mut self, batch: &TelemetryBatch) -> Result<Vec<u64>, BufferError> {
        let body = postcard::to_stdvec(batch)
            .map_err(|e| BufferError { path: self.dir.clone(), source: io::Error::other(e) })?;
        let mut record = Vec::with_capacity(body.len() + 8);
        record.extend_from_slice(&(body.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        record.extend_from_slice(&body);

        let rotate = self.segments.back().is_none_or(|s| s.bytes + record.len() as u64 > self.segment_bytes)
            || self.current.is_none();
        if rotate {
            self.rotate()?;
        }
        let (Some(file), Some(segment)) = (self.current.as_mut(), self.segments.back_mut()) else {
            return Err(BufferError { path: self.dir.clone(), source: io::Error::other("no open segment") });
        };
        file.write_all(&record).map_err(err(&segment.path))?;
        segment.bytes += record.len() as u64;
        segment.live.insert(batch.seq);
        self.total_bytes += record.len() as u64;

        let mut dropped = Vec::new();
        while self.total_bytes > self.max_bytes && self.segments.len() > 1 {
            if let Some(oldest) = self.segments.pop_front() {
                dropped.extend(oldest.live.iter().copied());
                self.total_bytes -= oldest.bytes;
                fs::remove_file(&oldest.path).map_err(err(&oldest.path))?;
            }
        }
        Ok(dropped)
    }

    /// Forgets acknowledged (or dropped) seqs; deletes segments left with none.
    pub fn remove(&mut self, seqs: &[u64]) -> Result<(), BufferError> {
        for seq in seqs {
            for s in self.segments.iter_mut() {
                if s.live.remove(seq) {
                    break;
                }
            }
        }
        let last = self.segments.back().map(|s| s.id);
        let mut kept = VecDeque::with_capacity(self.segments.len());
        while let Some(s) = self.segments.pop_front() {
            // The segment being written stays until it is rotated out.
            if s.live.is_empty() && Some(s.id) != last {
                self.total_bytes -= s.bytes;
                fs::remove_file(&s.path).map_err(err(&s.path))?;
            } else {
                kept.push_back(s);
            }
        }
        self.segments = kept;
        Ok(())
    }

    /// Flushes the open segment to disk (on shutdown).
    pub fn sync(&mut self) -> Result<(), BufferError> {
        if let (Some(f), Some(s)) = (self.current.as_mut(), self.segments.back()) {
            f.sync_data().map_err(err(&s.path))?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), BufferError> {
        self.sync()?;
        let id = self.segments.back().map_or(1, |s| s.id + 1);
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(err(&path))?;
        // A rotated-out segment with nothing live goes now.
        self.segments.push_back(Segment { id, path, bytes: 0, live: BTreeSet::new() });
        self.current = Some(file);
        self.remove(&[])
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// Reads every intact record; returns them and the length of the intact prefix.
fn read_segment(path: &Path) -> Result<(Vec<TelemetryBatch>, u64), BufferError> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(err(path))?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= bytes.len() {
        let len = u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]) as usize;
        let crc = u32::from_le_bytes([bytes[pos + 4], bytes[pos + 5], bytes[pos + 6], bytes[pos + 7]]);
        let Some(body) = bytes.get(pos + 8..pos + 8 + len) else { break };
        if len > MAX_RECORD || crc32fast::hash(body) != crc {
            break;
        }
        match postcard::from_bytes::<TelemetryBatch>(body) {
            Ok(batch) => out.push(batch),
            Err(_) => break,
        }
        pos += 8 + len;
    }
    Ok((out, pos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64) -> TelemetryBatch {
        TelemetryBatch { seq, created_unix_ms: 1_700_000_000_000 + seq as i64, ..Default::default() }
    }

    #[test]
    fn batches_survive_reopen_until_acked() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut b, loaded) = DiskBuffer::open(dir.path(), 1 << 20).unwrap();
            assert!(loaded.is_empty());
            for seq in 1..=10 {
                assert!(b.append(&batch(seq)).unwrap().is_empty());
            }
            b.remove(&[1, 2, 3]).unwrap();
        }
        let (_, loaded) = DiskBuffer::open(dir.path(), 1 << 20).unwrap();
        let seqs: Vec<u64> = loaded.iter().map(|b| b.seq).collect();
        // Acked batches in a still-open segment may come back: the controller de-duplicates.
        assert!(seqs.ends_with(&[4, 5, 6, 7, 8, 9, 10]), "{seqs:?}");
        assert_eq!(loaded.last().unwrap().created_unix_ms, batch(10).created_unix_ms, "original timestamps");
    }

    #[test]
    fn fully_acked_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut b, _) = DiskBuffer::open(dir.path(), 64 * 1024 * 16).unwrap();
        let big = |seq| TelemetryBatch {
            samples: vec![flotilla_common::model::Sample { name: "x".repeat(20_000), ..Default::default() }],
            ..batch(seq)
        };
        for seq in 1..=20 {
            b.append(&big(seq)).unwrap();
        }
        let files = || fs::read_dir(dir.path()).unwrap().count();
        let before = files();
        assert!(before > 1);
        b.remove(&(1..=20).collect::<Vec<_>>()).unwrap();
        assert_eq!(files(), 1, "only the open segment remains");
        let (_, loaded) = DiskBuffer::open(dir.path(), 1 << 20).unwrap();
        assert!(loaded.len() < 20);
    }

    #[test]
    fn the_bound_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let (mut b, _) = DiskBuffer::open(dir.path(), 64 * 1024).unwrap();
        let big = |seq| TelemetryBatch {
            samples: vec![flotilla_common::model::Sample { name: "x".repeat(10_000), ..Default::default() }],
            ..batch(seq)
        };
        let mut dropped = Vec::new();
        for seq in 1..=40 {
            dropped.extend(b.append(&big(seq)).unwrap());
        }
        assert!(!dropped.is_empty());
        assert_eq!(dropped[0], 1, "oldest first");
        assert!(b.bytes() <= 64 * 1024 + 11_000);
    }

    #[test]
    fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut b, _) = DiskBuffer::open(dir.path(), 1 << 20).unwrap();
            for seq in 1..=3 {
                b.append(&batch(seq)).unwrap();
            }
        }
        let seg = fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap(); // half a header
        drop(f);
        let (mut b, loaded) = DiskBuffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(loaded.len(), 3);
        b.append(&batch(4)).unwrap();
        let (_, loaded) = DiskBuffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(loaded.iter().map(|b| b.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    }
}
