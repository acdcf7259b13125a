//! `CreateBackup`: the store, streamed as a self-checking backup file. The
//! state trees are copied in one consistent moment (state writes wait for the
//! copy, not for the client); telemetry, when asked for, streams after.

use std::collections::BTreeMap;
use std::io::Write;

use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::ops::{actor_for_action, audit};
use crate::service::{Context, blocking};
use crate::store::StoreError;
use crate::store::backup::{DATA_FILES, STATE_TREES, TELEMETRY_TREES, Writer};

/// Bytes per streamed chunk: well under the default 4 MiB message limit.
const CHUNK_BYTES: usize = 256 * 1024;

type Chunks = mpsc::Sender<Result<pb::BackupChunk, Status>>;

/// Buffers the backup's bytes into chunks and sends them; a client that went
/// away turns into an I/O error that stops the copy.
struct ChunkSink {
    tx: Chunks,
    buf: Vec<u8>,
}

impl ChunkSink {
    fn send(&mut self, part: pb::backup_chunk::Part) -> std::io::Result<()> {
        self.tx
            .blocking_send(Ok(pb::BackupChunk { part: Some(part) }))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client stopped reading the backup"))
    }
}

impl Write for ChunkSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buf);
        self.send(pb::backup_chunk::Part::Data(data))
    }
}

type Trees = BTreeMap<&'static str, Vec<(Vec<u8>, Vec<u8>)>>;

pub async fn create(
    ctx: &Context,
    request: Request<pb::CreateBackupRequest>,
) -> Result<Response<super::CreateBackupStream>, Status> {
    let actor = actor_for_action(&request)?;
    let include_telemetry = request.get_ref().include_telemetry;
    // Audited first, so the backup holds its own record.
    audit(ctx, &actor, "store.backup", "store", serde_json::json!({ "include_telemetry": include_telemetry })).await?;
    let store = ctx.store.clone();
    let state = blocking("copying the store", move || {
        let mut trees: Trees = STATE_TREES.iter().map(|t| (*t, Vec::new())).collect();
        store.scan_trees(STATE_TREES, true, &mut |tree, k, v| {
            if let Some(entries) = STATE_TREES.iter().find(|t| **t == tree).and_then(|t| trees.get_mut(t)) {
                entries.push((k.to_vec(), v.to_vec()));
            }
            Ok(())
        })?;
        Ok(trees)
    })
    .await?;
    let (tx, rx) = mpsc::channel(4);
    let store = ctx.store.clone();
    let data_dir = ctx.config.data_dir.clone();
    tokio::task::spawn_blocking(move || {
        let failed = tx.clone();
        if let Err(error) = stream(store.as_ref(), &data_dir, state, include_telemetry, tx) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                tracing::warn!("backup abandoned: the client stopped reading");
            } else {
                tracing::error!(%error, "backup failed");
                let _ = failed.blocking_send(Err(Status::internal("the backup failed; see the controller log")));
            }
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

fn stream(
    store: &dyn crate::store::Store,
    data_dir: &std::path::Path,
    state: Trees,
    include_telemetry: bool,
    tx: Chunks,
) -> std::io::Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let created = now_unix_ms();
    let schema = crate::store::SCHEMA_VERSION;
    let mut sink = ChunkSink { tx, buf: Vec::with_capacity(CHUNK_BYTES) };
    sink.send(pb::backup_chunk::Part::Header(pb::BackupHeader {
        controller_version: version.to_owned(),
        store_schema: schema,
        created_unix_ms: created,
    }))?;
    let mut writer = Writer::new(sink, schema, created, version)?;
    for tree in STATE_TREES {
        writer.tree(tree)?;
        for (k, v) in state.get(tree).into_iter().flatten() {
            writer.entry(k, v)?;
        }
    }
    if include_telemetry {
        for tree in TELEMETRY_TREES {
            writer.tree(tree)?;
            store
                .scan_trees(&[tree], false, &mut |_, k, v| {
                    writer.entry(k, v).map_err(|e| StoreError::Encode(format!("backup stream: {e}")))
                })
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
    }
    for name in DATA_FILES {
        match std::fs::read(data_dir.join(name)) {
            Ok(content) => writer.file(name, &content)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let (summary, mut sink) = writer.finish()?;
    sink.flush()?;
    tracing::info!(bytes = summary.bytes, sha256 = %summary.sha256, include_telemetry, "backup streamed");
    sink.send(pb::backup_chunk::Part::Trailer(pb::BackupTrailer {
        sha256: summary.sha256,
        bytes: summary.bytes,
        records: summary.records.into_iter().collect(),
    }))
}
