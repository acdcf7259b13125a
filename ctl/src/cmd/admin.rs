//! `flotctl approve`, `approvals`, `backup` and `version`: administration.

use std::io::Write;
use std::path::Path;

use anyhow::Context as _;
use flotilla_proto::pb;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::approval;
use crate::cli::{ApprovalsCmd, ApproveArgs, BackupCmd, VersionArgs};
use crate::client::{call, connect, status_error};
use crate::context::Connection;
use crate::output;

/// An approval as flotctl shows it (stable field names; the held response is
/// left out: the requester's flotctl prints it).
#[derive(Debug, Serialize)]
struct ApprovalView {
    id: String,
    /// pending, running, succeeded, failed, rejected or expired.
    state: String,
    verb: String,
    target: String,
    summary: String,
    requested_by: String,
    requested_unix_ms: i64,
    expires_unix_ms: i64,
    decided_by: String,
    decided_unix_ms: i64,
    reason: String,
    finished_unix_ms: i64,
    error: String,
}

fn state_name(state: i32) -> &'static str {
    match pb::ApprovalState::try_from(state) {
        Ok(pb::ApprovalState::Pending) => "pending",
        Ok(pb::ApprovalState::Running) => "running",
        Ok(pb::ApprovalState::Succeeded) => "succeeded",
        Ok(pb::ApprovalState::Failed) => "failed",
        Ok(pb::ApprovalState::Rejected) => "rejected",
        Ok(pb::ApprovalState::Expired) => "expired",
        _ => "unknown",
    }
}

impl From<&pb::Approval> for ApprovalView {
    fn from(a: &pb::Approval) -> Self {
        Self {
            id: a.id.clone(),
            state: state_name(a.state).to_owned(),
            verb: a.verb.clone(),
            target: a.target.clone(),
            summary: a.summary.clone(),
            requested_by: a.requested_by.clone(),
            requested_unix_ms: a.requested_unix_ms,
            expires_unix_ms: a.expires_unix_ms,
            decided_by: a.decided_by.clone(),
            decided_unix_ms: a.decided_unix_ms,
            reason: a.reason.clone(),
            finished_unix_ms: a.finished_unix_ms,
            error: a.error.clone(),
        }
    }
}

fn approvals_table(list: &[ApprovalView]) -> String {
    let mut t = output::table(&["ID", "STATE", "VERB", "TARGET", "REQUESTED BY", "EXPIRES", "DECIDED BY"]);
    for a in list {
        t.add_row(vec![
            a.id.clone(),
            a.state.clone(),
            a.verb.clone(),
            a.target.clone(),
            a.requested_by.clone(),
            output::rfc3339(a.expires_unix_ms),
            a.decided_by.clone(),
        ]);
    }
    if list.is_empty() { "no approvals".to_owned() } else { t.to_string() }
}

fn approval_text(a: &ApprovalView) -> String {
    let mut out = format!(
        "approval {}: {}\n  {}\n  requested by {} at {}, expires {}\n",
        a.id,
        a.state,
        a.summary,
        a.requested_by,
        output::rfc3339(a.requested_unix_ms),
        output::rfc3339(a.expires_unix_ms)
    );
    if !a.decided_by.is_empty() {
        out.push_str(&format!("  decided by {} at {}", a.decided_by, output::rfc3339(a.decided_unix_ms)));
        if !a.reason.is_empty() {
            out.push_str(&format!(" ({})", a.reason));
        }
        out.push('\n');
    }
    if a.finished_unix_ms > 0 {
        out.push_str(&format!("  finished at {}", output::rfc3339(a.finished_unix_ms)));
        if !a.error.is_empty() {
            out.push_str(&format!(": {}", a.error));
        }
        out.push('\n');
    }
    out.trim_end().to_owned()
}

pub async fn approve(args: ApproveArgs, conn: &Connection) -> anyhow::Result<()> {
    if args.reject && args.reason.trim().is_empty() {
        return Err(
            crate::UsageError("--reject needs --reason: it goes to the audit log and the requester".into()).into()
        );
    }
    let mut client = connect(conn).await?;
    let what = format!("{} approval {}", if args.reject { "reject" } else { "approve" }, args.id);
    let request = pb::DecideApprovalRequest { id: args.id.clone(), approve: !args.reject, reason: args.reason.clone() };
    let mut decided = call(&what, client.decide_approval(request).await)?;
    if !args.reject && !args.no_wait {
        eprintln!("flotctl: approved; waiting for the action to finish: {}", decided.summary);
        decided = approval::wait(&mut client, &args.id).await?;
    }
    let view = ApprovalView::from(&decided);
    output::print(args.output, &view, approval_text)?;
    if view.state == "failed" {
        let status = tonic::Status::new(tonic::Code::from_i32(decided.error_code), decided.error.clone());
        return Err(status_error(&format!("the approved action ({})", decided.summary), &status));
    }
    Ok(())
}

pub async fn approvals(cmd: ApprovalsCmd, conn: &Connection) -> anyhow::Result<()> {
    let mut client = connect(conn).await?;
    match cmd {
        ApprovalsCmd::Ls { all, output } => {
            let list = call("list approvals", client.list_approvals(pb::ListApprovalsRequest { all }).await)?;
            let views: Vec<ApprovalView> = list.approvals.iter().map(ApprovalView::from).collect();
            output::print(output, &views, |v| approvals_table(v))
        }
        ApprovalsCmd::Show { id, output } => {
            let a =
                call(&format!("approval {id}"), client.get_approval(pb::GetApprovalRequest { id: id.clone() }).await)?;
            output::print(output, &ApprovalView::from(&a), approval_text)
        }
    }
}

pub async fn backup(cmd: BackupCmd, conn: &Connection) -> anyhow::Result<()> {
    let BackupCmd::Create { file, telemetry } = cmd;
    let mut client = connect(conn).await?;
    let request = pb::CreateBackupRequest { include_telemetry: telemetry };
    let mut stream = call("back up the store", client.create_backup(request).await)?;
    // Written beside the target and renamed once the checksum matched: FILE is
    // either a whole, checked backup or absent.
    let partial = file.with_extension("partial");
    let mut out = create_private(&file, &partial)?;
    let written = receive(&mut stream, &mut out, &partial).await;
    let (trailer, header) = match written {
        Ok(done) => done,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    out.sync_all().with_context(|| format!("sync {}", partial.display()))?;
    std::fs::rename(&partial, &file).with_context(|| format!("rename {} to {}", partial.display(), file.display()))?;
    let records: u64 = trailer.records.values().sum();
    println!(
        "backup written to {}: {} bytes, {records} records, sha256 {} (controller {}, store schema {})",
        file.display(),
        trailer.bytes,
        trailer.sha256,
        header.controller_version,
        header.store_schema
    );
    println!("restore with: flotilla-controller restore {} --data-dir EMPTY_DIR", file.display());
    Ok(())
}

/// Opens `partial` for the backup (0600: it holds the command-signing key),
/// refusing when `file` exists.
fn create_private(file: &Path, partial: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if file.exists() {
        return Err(crate::UsageError(format!("{} exists; choose a new file name", file.display())).into());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(partial)
        .with_context(|| format!("create {}", partial.display()))
}

/// Writes the streamed body to `out`, then checks the file's size and its
/// checksum record against the trailer.
async fn receive(
    stream: &mut tonic::Streaming<pb::BackupChunk>,
    out: &mut std::fs::File,
    partial: &Path,
) -> anyhow::Result<(pb::BackupTrailer, pb::BackupHeader)> {
    let mut bytes: u64 = 0;
    let mut header = None;
    while let Some(chunk) = stream.message().await.map_err(|s| status_error("back up the store", &s))? {
        match chunk.part {
            Some(pb::backup_chunk::Part::Header(h)) => header = Some(h),
            Some(pb::backup_chunk::Part::Data(data)) => {
                bytes += data.len() as u64;
                out.write_all(&data).with_context(|| format!("write {}", partial.display()))?;
            }
            Some(pb::backup_chunk::Part::Trailer(trailer)) => {
                let header = header.ok_or_else(|| anyhow::anyhow!("the controller sent a backup without a header"))?;
                if trailer.bytes != bytes {
                    anyhow::bail!("the backup stream ended short: {bytes} of {} bytes arrived", trailer.bytes);
                }
                out.flush().with_context(|| format!("write {}", partial.display()))?;
                check_file(partial, &trailer.sha256)?;
                return Ok((trailer, header));
            }
            None => {}
        }
    }
    anyhow::bail!(
        "the backup stream ended before its trailer: the controller stopped or the connection broke; try again"
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the file as written: its last 33 bytes are the checksum record (`Z`
/// and the SHA-256 of everything before it), which must match the file and
/// the controller's `sha256`.
fn check_file(partial: &Path, sha256: &str) -> anyhow::Result<()> {
    use std::io::{Read, Seek};
    let context = || format!("read back {}", partial.display());
    let mut file = std::fs::File::open(partial).with_context(context)?;
    let len = file.metadata().with_context(context)?.len();
    let Some(body_len) = len.checked_sub(33) else {
        anyhow::bail!("the backup is too short to be whole");
    };
    let mut hash = Sha256::new();
    std::io::copy(&mut (&mut file).take(body_len), &mut hash).with_context(context)?;
    let mut record = [0u8; 33];
    file.seek(std::io::SeekFrom::Start(body_len)).with_context(context)?;
    file.read_exact(&mut record).with_context(context)?;
    let computed = hex(&hash.finalize());
    if record[0] != b'Z' || hex(&record[1..]) != computed || computed != sha256 {
        anyhow::bail!(
            "the backup's checksum does not match (controller said {sha256}, file has {computed}); try again"
        );
    }
    Ok(())
}

/// `flotctl version`: the client, and the controller unless `--client`.
#[derive(Debug, Serialize)]
struct Versions {
    client: String,
    client_protocol: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    controller: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    controller_protocol: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    controller_store_schema: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<String>,
}

/// Why these versions should not be used together, if they should not.
fn skew(client: &str, client_protocol: u32, controller: &str, controller_protocol: u32) -> Option<String> {
    if client_protocol != controller_protocol {
        return Some(format!(
            "flotctl speaks protocol {client_protocol} and the controller {controller_protocol}: use a flotctl of the controller's release ({controller})"
        ));
    }
    let major_minor = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    (major_minor(client) != major_minor(controller)).then(|| {
        format!(
            "flotctl {client} and controller {controller} are different releases: fields new in either are not shown; use matching versions"
        )
    })
}

pub async fn version(args: VersionArgs, conn: Option<&Connection>) -> anyhow::Result<()> {
    let client_version = env!("CARGO_PKG_VERSION");
    let mut versions = Versions {
        client: client_version.to_owned(),
        client_protocol: flotilla_proto::PROTOCOL_VERSION,
        controller: None,
        controller_protocol: None,
        controller_store_schema: None,
        warning: None,
    };
    if let Some(conn) = conn {
        let mut client = connect(conn).await?;
        let v = call("ask the controller's version", client.get_version(pb::GetVersionRequest {}).await)?;
        versions.warning = skew(client_version, flotilla_proto::PROTOCOL_VERSION, &v.version, v.protocol);
        versions.controller = Some(v.version);
        versions.controller_protocol = Some(v.protocol);
        versions.controller_store_schema = Some(v.store_schema);
    }
    if let Some(warning) = &versions.warning {
        eprintln!("flotctl: warning: {warning}");
    }
    output::print(args.output, &versions, |v| {
        let mut out = format!("flotctl     {} (protocol {})", v.client, v.client_protocol);
        if let (Some(c), Some(p), Some(s)) = (&v.controller, v.controller_protocol, v.controller_store_schema) {
            out.push_str(&format!("\ncontroller  {c} (protocol {p}, store schema {s})"));
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_is_a_protocol_or_release_difference() {
        assert_eq!(skew("0.1.0", 1, "0.1.3", 1), None, "patch releases mix");
        assert!(skew("0.1.0", 1, "0.2.0", 1).unwrap().contains("different releases"));
        assert!(skew("0.1.0", 1, "0.1.0", 2).unwrap().contains("protocol 1 and the controller 2"));
    }

    #[test]
    fn a_format_that_is_not_a_table_keeps_its_field_names() {
        let a = pb::Approval { id: "x".into(), state: pb::ApprovalState::Pending.into(), ..Default::default() };
        let json = serde_json::to_value(ApprovalView::from(&a)).unwrap();
        assert_eq!(json["state"], "pending");
        assert_eq!(json["id"], "x");
    }
}
