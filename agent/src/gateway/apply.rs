//! Swapping an upstream file in safely: the new text goes to `NAME.conf.new`, the
//! current file is copied to `NAME.conf.bak`, the new one is renamed over it, then
//! nginx checks, reloads and confirms. Any failure puts the previous file back
//! (and, once nginx may have loaded the new one, reloads again), so nginx keeps
//! serving the old weights. Nginx itself is behind [`NginxControl`] so that the
//! failure paths are tested without it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use super::GatewayError;

/// What the swap needs from nginx.
pub(crate) trait NginxControl {
    /// `nginx -t`: `Err` carries nginx's reason.
    async fn test(&self) -> Result<(), String>;
    /// `nginx -s reload`: `Err` carries nginx's reason.
    async fn reload(&self) -> Result<(), String>;
    /// Waits until nginx serves `revision` for `upstream`; `Err` says what it served instead.
    async fn confirm(&self, upstream: &str, revision: &str) -> Result<(), String>;
}

/// The three paths of one upstream's file.
struct Files {
    live: PathBuf,
    new: PathBuf,
    bak: PathBuf,
}

impl Files {
    fn new(dir: &Path, upstream: &str) -> Self {
        Self {
            live: dir.join(format!("{upstream}.conf")),
            new: dir.join(format!("{upstream}.conf.new")),
            bak: dir.join(format!("{upstream}.conf.bak")),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GatewayError + '_ {
    move |source| GatewayError::Io { path: path.display().to_string(), source }
}

/// Puts the previous file back: the backup when there was one, else no file.
async fn restore(files: &Files, had_previous: bool) -> Result<(), GatewayError> {
    if had_previous {
        tokio::fs::rename(&files.bak, &files.live).await.map_err(io(&files.bak))
    } else {
        match tokio::fs::remove_file(&files.live).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&files.live)(e)),
            _ => Ok(()),
        }
    }
}

/// How restoring went, for the error the caller sees.
async fn restore_and_reload(files: &Files, had_previous: bool, nginx: &impl NginxControl) -> String {
    if let Err(e) = restore(files, had_previous).await {
        return format!("restoring the previous file failed too: {e}");
    }
    match nginx.reload().await {
        Ok(()) => "the previous file is back and nginx was reloaded with it".to_owned(),
        Err(e) => format!("the previous file is back, but reloading nginx with it failed: {e}"),
    }
}

/// Installs `text` as `dir/UPSTREAM.conf` and makes nginx run it. Returns how long
/// the reload took, from `nginx -s reload` to the confirmed revision.
pub(crate) async fn apply(
    dir: &Path,
    upstream: &str,
    text: &str,
    revision: &str,
    nginx: &impl NginxControl,
) -> Result<Duration, GatewayError> {
    let files = Files::new(dir, upstream);
    tokio::fs::write(&files.new, text).await.map_err(io(&files.new))?;
    let had_previous = tokio::fs::try_exists(&files.live).await.map_err(io(&files.live))?;
    if had_previous {
        // A copy, not a rename: the live file never goes missing.
        tokio::fs::copy(&files.live, &files.bak).await.map_err(io(&files.bak))?;
    }
    tokio::fs::rename(&files.new, &files.live).await.map_err(io(&files.new))?;

    if let Err(reason) = nginx.test().await {
        // nginx never loaded the new file: putting the old one back is enough.
        let restored = match restore(&files, had_previous).await {
            Ok(()) => "the previous file is back".to_owned(),
            Err(e) => format!("restoring the previous file failed too: {e}"),
        };
        return Err(GatewayError::Rejected { reason, restored });
    }
    let started = Instant::now();
    if let Err(reason) = nginx.reload().await {
        let restored = restore_and_reload(&files, had_previous, nginx).await;
        return Err(GatewayError::Reload { reason, restored });
    }
    if let Err(reason) = nginx.confirm(upstream, revision).await {
        let restored = restore_and_reload(&files, had_previous, nginx).await;
        return Err(GatewayError::NotConfirmed { reason, restored });
    }
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Fails whichever step it is told to, and records the calls and what the
    /// live file held at each.
    #[derive(Default)]
    struct FakeNginx {
        live: PathBuf,
        fail_test: bool,
        fail_reload: bool,
        fail_confirm: bool,
        calls: Mutex<Vec<String>>,
    }

    impl FakeNginx {
        fn record(&self, step: &str) {
            let content = std::fs::read_to_string(&self.live).unwrap_or_else(|_| "<none>".into());
            self.calls.lock().unwrap().push(format!("{step}:{content}"));
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl NginxControl for FakeNginx {
        async fn test(&self) -> Result<(), String> {
            self.record("test");
            if self.fail_test { Err("host not found in upstream".into()) } else { Ok(()) }
        }
        async fn reload(&self) -> Result<(), String> {
            self.record("reload");
            if self.fail_reload { Err("no pid file".into()) } else { Ok(()) }
        }
        async fn confirm(&self, _upstream: &str, _revision: &str) -> Result<(), String> {
            self.record("confirm");
            if self.fail_confirm { Err("served \"old\"".into()) } else { Ok(()) }
        }
    }

    fn setup(previous: Option<&str>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("llama.conf");
        if let Some(text) = previous {
            std::fs::write(&live, text).unwrap();
        }
        (dir, live)
    }

    #[tokio::test]
    async fn a_good_file_is_installed_with_the_old_one_kept_as_bak() {
        let (dir, live) = setup(Some("old"));
        let nginx = FakeNginx { live: live.clone(), ..Default::default() };
        apply(dir.path(), "llama", "new", "r", &nginx).await.unwrap();
        assert_eq!(std::fs::read_to_string(&live).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(dir.path().join("llama.conf.bak")).unwrap(), "old");
        assert!(!dir.path().join("llama.conf.new").exists());
        assert_eq!(nginx.calls(), ["test:new", "reload:new", "confirm:new"]);
    }

    #[tokio::test]
    async fn a_file_nginx_rejects_is_replaced_by_the_old_one_without_a_reload() {
        let (dir, live) = setup(Some("old"));
        let nginx = FakeNginx { live: live.clone(), fail_test: true, ..Default::default() };
        let err = apply(dir.path(), "llama", "new", "r", &nginx).await.unwrap_err().to_string();
        assert!(err.contains("host not found in upstream") && err.contains("previous file is back"), "{err}");
        assert_eq!(std::fs::read_to_string(&live).unwrap(), "old");
        assert_eq!(nginx.calls(), ["test:new"]);
    }

    #[tokio::test]
    async fn a_rejected_first_file_leaves_no_file() {
        let (dir, live) = setup(None);
        let nginx = FakeNginx { live: live.clone(), fail_test: true, ..Default::default() };
        apply(dir.path(), "llama", "new", "r", &nginx).await.unwrap_err();
        assert!(!live.exists());
    }

    #[tokio::test]
    async fn a_failed_reload_restores_and_reloads_the_old_file() {
        let (dir, live) = setup(Some("old"));
        let nginx = FakeNginx { live: live.clone(), fail_reload: true, ..Default::default() };
        let err = apply(dir.path(), "llama", "new", "r", &nginx).await.unwrap_err().to_string();
        assert!(err.contains("no pid file") && err.contains("reloading nginx with it failed"), "{err}");
        assert_eq!(std::fs::read_to_string(&live).unwrap(), "old");
        assert_eq!(nginx.calls(), ["test:new", "reload:new", "reload:old"]);
    }

    #[tokio::test]
    async fn an_unconfirmed_reload_restores_and_reloads_the_old_file() {
        let (dir, live) = setup(Some("old"));
        let nginx = FakeNginx { live: live.clone(), fail_confirm: true, ..Default::default() };
        let err = apply(dir.path(), "llama", "new", "r", &nginx).await.unwrap_err().to_string();
        assert!(err.contains("served \"old\"") && err.contains("reloaded with it"), "{err}");
        assert_eq!(std::fs::read_to_string(&live).unwrap(), "old");
        assert_eq!(nginx.calls(), ["test:new", "reload:new", "confirm:new", "reload:old"]);
    }
}
