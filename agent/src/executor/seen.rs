//! The set of command ids this agent has accepted, persisted until they expire,
//! so that a replay is refused even after an agent restart; and the results of
//! those commands, so that a resent command returns its stored result instead of
//! running twice.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use flotilla_common::envelope::{CLOCK_SKEW, CommandId};
use serde::{Deserialize, Serialize};

/// A stored command result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResult {
    pub status: flotilla_common::command::CommandStatus,
    pub detail: String,
    pub output: serde_json::Value,
}

/// Accepted ids with their expiry, and results by id.
#[derive(Debug)]
pub struct SeenIds {
    dir: PathBuf,
    ids: HashMap<CommandId, i64>,
}

impl SeenIds {
    /// Loads the set from `dir`, dropping entries long expired.
    pub fn open(dir: &Path, now_unix_ms: i64) -> std::io::Result<Self> {
        fs::create_dir_all(dir.join("results"))?;
        let path = dir.join("seen");
        let text = fs::read_to_string(&path).unwrap_or_default();
        let keep_until = now_unix_ms - CLOCK_SKEW.as_millis() as i64;
        let ids: HashMap<CommandId, i64> = text
            .lines()
            .filter_map(|l| {
                let (id, exp) = l.split_once(' ')?;
                Some((id.parse().ok()?, exp.parse().ok()?))
            })
            .filter(|(_, exp): &(CommandId, i64)| *exp >= keep_until)
            .collect();
        let seen = Self { dir: dir.to_owned(), ids };
        seen.compact()?;
        Ok(seen)
    }

    /// Whether `id` was accepted before.
    pub fn contains(&self, id: &CommandId) -> bool {
        self.ids.contains_key(id)
    }

    /// Records `id` durably (fsync) before the command runs.
    pub fn insert(&mut self, id: CommandId, expires_at_unix_ms: i64) -> std::io::Result<()> {
        let mut f = OpenOptions::new().create(true).append(true).open(self.dir.join("seen"))?;
        f.write_all(format!("{id} {expires_at_unix_ms}\n").as_bytes())?;
        f.sync_data()?;
        self.ids.insert(id, expires_at_unix_ms);
        Ok(())
    }

    /// Stores the result of `id`.
    pub fn store_result(&self, id: &CommandId, result: &StoredResult) -> std::io::Result<()> {
        let path = self.dir.join("results").join(format!("{id}.json"));
        let text = serde_json::to_vec(result).map_err(std::io::Error::other)?;
        fs::write(path, text)
    }

    /// The stored result of `id`, if it finished.
    pub fn result(&self, id: &CommandId) -> Option<StoredResult> {
        let text = fs::read(self.dir.join("results").join(format!("{id}.json"))).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Rewrites the file with live entries only and removes results of expired ids.
    fn compact(&self) -> std::io::Result<()> {
        let tmp = self.dir.join("seen.tmp");
        let text: String = self.ids.iter().map(|(id, exp)| format!("{id} {exp}\n")).collect();
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.dir.join("seen"))?;
        for entry in fs::read_dir(self.dir.join("results"))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let live = name
                .strip_suffix(".json")
                .and_then(|id| id.parse::<CommandId>().ok())
                .is_some_and(|id| self.contains(&id));
            if !live {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_a_restart_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_800_000_000_000;
        let (a, b) = (CommandId::new(), CommandId::new());
        {
            let mut seen = SeenIds::open(dir.path(), now).unwrap();
            seen.insert(a, now + 30_000).unwrap();
            seen.insert(b, now - 3_600_000).unwrap();
            let r = StoredResult {
                status: flotilla_common::command::CommandStatus::Succeeded,
                detail: "ok".into(),
                output: serde_json::json!({}),
            };
            seen.store_result(&a, &r).unwrap();
        }
        let seen = SeenIds::open(dir.path(), now).unwrap();
        assert!(seen.contains(&a));
        assert!(!seen.contains(&b), "long expired ids are forgotten");
        assert_eq!(seen.result(&a).unwrap().detail, "ok");
        let later = SeenIds::open(dir.path(), now + 3_600_000).unwrap();
        assert!(!later.contains(&a));
        assert!(later.result(&a).is_none());
    }
}
