//! Follows a log file the way `tail -F` does, one bounded read per round.
//!
//! - At agent start an existing file is read from its end: what nginx logged
//!   before the agent ran was counted by no one, and counting it now would put a
//!   burst of old responses into the current interval.
//! - A file that appears later (it was missing, or log rotation renamed it and
//!   nginx opened a new one) is read from its start.
//! - Rotation by rename (logrotate's default, then `nginx -s reopen`): the path
//!   now names another inode. The old file is read to its end first (nginx may
//!   still have written to it until it reopened), then the new one from its start.
//! - Rotation by truncation (`copytruncate`): the file is shorter than where we
//!   were, so it is read again from its start. (Were it to grow past that point
//!   again between two rounds, the truncation cannot be seen; rename-based
//!   rotation has no such gap.)
//! - A line without its newline yet is kept until the rest arrives.

use std::fs::{File, Metadata};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The most bytes read per round: at about 60 bytes a line, some 70 000 lines,
/// far beyond one gateway's few thousand requests a second times a 5 s interval,
/// yet a round that finds a huge backlog stays short; the rest waits for the next.
pub(crate) const MAX_READ: u64 = 4 << 20;

/// The longest line kept whole; a longer one (not our format) is dropped, not
/// buffered without bound.
pub(crate) const MAX_LINE: usize = 8 << 10;

/// A file being followed.
#[derive(Debug)]
pub(crate) struct Tail {
    path: PathBuf,
    open: Option<Open>,
    /// The start of a line whose newline has not been read yet.
    partial: Vec<u8>,
    /// Inside an over-long line: bytes are dropped until its newline.
    skipping: bool,
}

#[derive(Debug)]
struct Open {
    file: File,
    /// (device, inode): which file this is, whatever the path names now.
    id: (u64, u64),
    pos: u64,
}

/// What one round read.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Lines {
    /// Complete lines, without their newlines.
    pub lines: Vec<String>,
    /// Lines dropped for being longer than [`MAX_LINE`].
    pub too_long: u64,
}

fn id(meta: &Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

impl Tail {
    /// Starts following `path` from its current end (or, if it does not exist
    /// yet, from the start of the file that appears there).
    pub fn new(path: &Path) -> Self {
        let mut tail = Self { path: path.to_owned(), open: None, partial: Vec::new(), skipping: false };
        // Missing or unreadable now: the first round says why.
        if let Ok(mut open) = tail.open_path() {
            open.pos = open.file.metadata().map_or(0, |m| m.len());
            tail.open = Some(open);
        }
        tail
    }

    fn open_path(&self) -> io::Result<Open> {
        let file = File::open(&self.path)?;
        let id = id(&file.metadata()?);
        Ok(Open { file, id, pos: 0 })
    }

    /// Reads what was appended since the last round, at most [`MAX_READ`] bytes.
    /// An error (the file is missing or unreadable) still returns nothing lost:
    /// the next round carries on from the same place.
    pub fn read(&mut self) -> io::Result<Lines> {
        let mut out = Lines::default();
        let mut budget = MAX_READ;
        let now = match std::fs::metadata(&self.path) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if let Some(open) = &mut self.open
            && let Some(meta) = &now
            && id(meta) == open.id
            && meta.len() < open.pos
        {
            // Truncated in place: what is there now is new.
            open.pos = 0;
            self.partial.clear();
            self.skipping = false;
        }
        if let Some(open_id) = self.open.as_ref().map(|o| o.id) {
            // The open file first, whether or not the path still names it: after a
            // rename nginx writes to it until it reopens its logs.
            self.drain(&mut out, &mut budget)?;
            // Switch once the old file is read to its end (budget left) and the new
            // one has something in it: nginx writes there only after reopening, and
            // never to the old file again. (An empty new file may be logrotate's
            // `create`, made before nginx reopened.)
            let replaced = now.as_ref().is_some_and(|meta| id(meta) != open_id && meta.len() > 0);
            if replaced && budget > 0 {
                self.open = None;
                self.partial.clear();
                self.skipping = false;
            }
        }
        if self.open.is_none() {
            if now.is_none() {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no such file"));
            }
            self.open = Some(self.open_path()?);
            self.drain(&mut out, &mut budget)?;
        }
        Ok(out)
    }

    /// Reads the open file from its position until its end or the budget, and
    /// splits what came into lines.
    fn drain(&mut self, out: &mut Lines, budget: &mut u64) -> io::Result<()> {
        let Some(open) = &mut self.open else { return Ok(()) };
        // Past the end of a file that is still written to, one read may come back
        // short; go on until a read returns nothing or the budget is spent.
        loop {
            if *budget == 0 {
                return Ok(());
            }
            open.file.seek(SeekFrom::Start(open.pos))?;
            let mut chunk = Vec::new();
            let n = (&mut open.file).take((*budget).min(1 << 20)).read_to_end(&mut chunk)? as u64;
            if n == 0 {
                return Ok(());
            }
            open.pos += n;
            *budget -= n;
            split(&mut self.partial, &mut self.skipping, &chunk, out);
        }
    }
}

/// Appends the complete lines of `partial + chunk` to `out` and keeps the
/// unfinished rest in `partial`.
fn split(partial: &mut Vec<u8>, skipping: &mut bool, chunk: &[u8], out: &mut Lines) {
    let mut rest = chunk;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let (piece, after) = rest.split_at(end);
        rest = &after[1..];
        if std::mem::take(skipping) {
            continue;
        }
        if partial.len() + piece.len() > MAX_LINE {
            partial.clear();
            out.too_long += 1;
            continue;
        }
        partial.extend_from_slice(piece);
        out.lines.push(String::from_utf8_lossy(partial).into_owned());
        partial.clear();
    }
    if *skipping {
        return;
    }
    if partial.len() + rest.len() > MAX_LINE {
        partial.clear();
        *skipping = true;
        out.too_long += 1;
    } else {
        partial.extend_from_slice(rest);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn an_existing_file_is_read_from_its_end_and_a_partial_line_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        append(&path, "old 1\nold 2\n");
        let mut tail = Tail::new(&path);
        assert_eq!(tail.read().unwrap(), Lines::default());
        append(&path, "new 1\nnew ");
        assert_eq!(tail.read().unwrap().lines, ["new 1"]);
        append(&path, "2\n");
        assert_eq!(tail.read().unwrap().lines, ["new 2"]);
        assert!(tail.read().unwrap().lines.is_empty());
    }

    #[test]
    fn a_file_that_appears_later_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut tail = Tail::new(&path);
        assert_eq!(tail.read().unwrap_err().kind(), io::ErrorKind::NotFound);
        append(&path, "first\n");
        assert_eq!(tail.read().unwrap().lines, ["first"]);
    }

    #[test]
    fn rotation_by_rename_reads_the_old_file_to_its_end_then_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        append(&path, "before\n");
        let mut tail = Tail::new(&path);
        append(&path, "a\n");
        assert_eq!(tail.read().unwrap().lines, ["a"]);
        // logrotate renames; nginx writes one more line to the old file before it reopens.
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        append(&rotated, "b\n");
        assert_eq!(tail.read().unwrap().lines, ["b"], "nothing at the path yet: the old file is still written");
        // logrotate's `create` makes the new file before nginx reopens its logs.
        append(&path, "");
        append(&rotated, "c\n");
        assert_eq!(tail.read().unwrap().lines, ["c"], "an empty new file: nginx has not reopened yet");
        append(&rotated, "d\n");
        append(&path, "e\nf\n");
        let r = tail.read().unwrap();
        assert_eq!(r.lines, ["d", "e", "f"], "the old file's end, then the new file from its start");
        append(&path, "g\n");
        assert_eq!(tail.read().unwrap().lines, ["g"]);
    }

    #[test]
    fn truncation_reads_the_file_again_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        append(&path, "x\n");
        let mut tail = Tail::new(&path);
        append(&path, "a long line here\nunfinished");
        assert_eq!(tail.read().unwrap().lines, ["a long line here"]);
        // copytruncate: the same inode, emptied, then written again.
        std::fs::OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
        append(&path, "y\n");
        assert_eq!(tail.read().unwrap().lines, ["y"], "the unfinished line before the truncation is gone");
    }

    #[test]
    fn reads_are_bounded_and_overlong_lines_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        append(&path, "");
        let mut tail = Tail::new(&path);
        let line = format!("{}\n", "x".repeat(99));
        let lines = (MAX_READ as usize / line.len()) + 10;
        append(&path, &line.repeat(lines));
        let first = tail.read().unwrap();
        assert_eq!(first.lines.len(), MAX_READ as usize / line.len(), "one round reads at most MAX_READ");
        assert_eq!(tail.read().unwrap().lines.len(), 10, "the rest comes next round");

        append(&path, &"y".repeat(MAX_LINE + 1));
        assert_eq!(tail.read().unwrap().too_long, 1);
        append(&path, "still the same long line\nshort\n");
        let r = tail.read().unwrap();
        assert_eq!((r.lines.as_slice(), r.too_long), (&["short".to_owned()][..], 0));
    }
}
