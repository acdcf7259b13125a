//! `--samples-csv`: the controller's memory and the store's size over a long run
//! (what `tests/bench/soak.sh` reads), and after the run the store's logical
//! size: the bytes of every key and value it holds, against its files on disk.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;

use super::{Controller, Tally, machine, round3};

/// One row every `every` from now until `until`: seconds since the first row,
/// the controller's VmRSS and CPU-seconds, the store's file bytes (lengths and
/// allocated blocks), batches acknowledged so far.
pub async fn sample(controller: &Controller, csv: &Path, every: Duration, tally: &Tally, until: Instant) -> Result<()> {
    let mut out = std::fs::File::create(csv).with_context(|| format!("{}", csv.display()))?;
    writeln!(
        out,
        "elapsed_s,controller_rss_bytes,controller_cpu_seconds,store_bytes,store_allocated_bytes,batches_acked"
    )?;
    let began = Instant::now();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let (rss, cpu) = (controller.rss_bytes()?, controller.cpu_seconds()?);
        let (bytes, allocated) = machine::disk_bytes(&controller.data_dir);
        let acked = tally.acked.load(Ordering::Relaxed);
        let at = began.elapsed().as_secs_f64();
        writeln!(out, "{at:.1},{rss},{cpu:.2},{bytes},{allocated},{acked}")?;
        out.flush()?;
        if Instant::now() + every > until {
            return Ok(());
        }
    }
}

/// The store after the run: what it holds against what it takes on disk.
#[derive(Debug, serde::Serialize)]
pub struct SpaceReport {
    /// Keys plus values of every entry of every tree.
    store_logical_bytes: u64,
    store_entries: u64,
    /// File lengths and allocated blocks (`du`) of the store's directory.
    store_file_bytes: u64,
    store_allocated_bytes: u64,
    /// Allocated bytes over logical bytes.
    space_amplification: f64,
}

/// Opens the stopped controller's store (sled, `DATA_DIR/store`) and counts its entries.
pub fn space(data_dir: &Path) -> Result<SpaceReport> {
    let path = data_dir.join("store");
    if !path.is_dir() {
        bail!("no store at {}", path.display());
    }
    let (file_bytes, allocated) = machine::disk_bytes(&path);
    let db = flotilla_controller::store::sled_config(&path, flotilla_controller::store::StoreOptions::default())
        .open()
        .context("open the store after the run")?;
    let (mut logical, mut entries) = (0u64, 0u64);
    for name in db.tree_names() {
        let tree = db.open_tree(&name).context("open a tree")?;
        for item in tree.iter() {
            let (k, v) = item.context("scan the store")?;
            logical += (k.len() + v.len()) as u64;
            entries += 1;
        }
    }
    drop(db);
    let amplification = allocated as f64 / logical.max(1) as f64;
    eprintln!(
        "store: {entries} entries, {logical} logical bytes, {file_bytes} file bytes, {allocated} allocated; amplification {amplification:.2}"
    );
    Ok(SpaceReport {
        store_logical_bytes: logical,
        store_entries: entries,
        store_file_bytes: file_bytes,
        store_allocated_bytes: allocated,
        space_amplification: round3(amplification),
    })
}
