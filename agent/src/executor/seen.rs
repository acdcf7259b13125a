//! The set of command ids this agent has accepted, persisted until a day after
//! they expire ([`RETENTION`]), so that a replay is refused even after an agent
//! restart; and the results of those commands, kept as long, so that a resent
//! command returns its stored result instead of running twice.
//!
//! Why a day and not just the envelope's validity: the controller's rollout driver
//! persists the commands it sends, and after a controller restart it sends each
//! unfinished one again, freshly signed but with the same id, possibly minutes
//! after the first envelope expired. The agent must answer with what the first
//! one did, not run it a second time (a second deploy or stop mid-rollout).

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use std::time::Duration;

use flotilla_common::envelope::{CLOCK_SKEW, CommandId};
use serde::{Deserialize, Serialize};

/// How long past its expiry (plus the clock-skew allowance) an accepted id and
/// its result are kept. A day covers any controller restart and resend that is
/// still part of the same rollout; the cost is a line and a small file per
/// command, and commands are rare (operators and rollouts, not telemetry).
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

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
    /// Loads the set from `dir`, dropping entries (and their results) that expired
    /// more than [`RETENTION`] (plus the clock skew) ago.
    pub fn open(dir: &Path, now_unix_ms: i64) -> std::io::Result<Self> {
        fs::create_dir_all(dir.join("results"))?;
        let path = dir.join("seen");
        let text = fs::read_to_string(&path).unwrap_or_default();
        let keep_until = now_unix_ms - (CLOCK_SKEW + RETENTION).as_millis() as i64;
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

    const HOUR_MS: i64 = 3_600_000;

    #[test]
    fn ids_and_results_survive_a_restart_for_a_day_past_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_800_000_000_000;
        let (a, b) = (CommandId::new(), CommandId::new());
        {
            let mut seen = SeenIds::open(dir.path(), now).unwrap();
            seen.insert(a, now + 30_000).unwrap();
            seen.insert(b, now - 25 * HOUR_MS).unwrap();
            let r = StoredResult {
                status: flotilla_common::command::CommandStatus::Succeeded,
                detail: "ok".into(),
                output: serde_json::json!({}),
            };
            seen.store_result(&a, &r).unwrap();
        }
        let seen = SeenIds::open(dir.path(), now).unwrap();
        assert!(seen.contains(&a));
        assert!(!seen.contains(&b), "ids expired more than a day ago are forgotten");
        assert_eq!(seen.result(&a).unwrap().detail, "ok");
        // A controller that restarts an hour later resends the same id: the result is there.
        let resent = SeenIds::open(dir.path(), now + HOUR_MS).unwrap();
        assert!(resent.contains(&a));
        assert_eq!(resent.result(&a).unwrap().detail, "ok");
        let still = SeenIds::open(dir.path(), now + 30_000 + RETENTION.as_millis() as i64).unwrap();
        assert!(still.contains(&a), "kept up to a day past expiry");
        let later = SeenIds::open(dir.path(), now + 30_000 + RETENTION.as_millis() as i64 + 31_000).unwrap();
        assert!(!later.contains(&a));
        assert!(later.result(&a).is_none(), "and its result with it");
    }
}
