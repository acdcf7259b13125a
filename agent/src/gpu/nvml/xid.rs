//! XID error events: a dedicated thread waits on an NVML event set and counts
//! critical XIDs per GPU and code, for `sample()` to report.
//!
//! NVML's event wait blocks the calling thread, so it cannot run on the async
//! runtime. The thread waits in short slices and checks a stop channel between
//! them; dropping [`XidWatcher`] closes the channel and joins the thread, which
//! therefore blocks the dropping thread for at most one slice ([`WAIT_SLICE_MS`]).

use std::collections::BTreeMap;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use flotilla_common::model::XidCount;
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;

/// How long one NVML wait may block: the bound on how long dropping the watcher
/// takes, and short enough that the loop costs nothing measurable.
pub const WAIT_SLICE_MS: u32 = 250;

/// The pause after a failed wait (other than a timeout), so that a persistent
/// failure, such as a GPU that fell off the bus, does not spin the thread.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// The code NVML reports when it cannot tell which XID occurred.
pub const UNKNOWN_XID: u64 = 999;

/// XID events seen since the agent started, per (GPU index, XID code).
#[derive(Debug, Default)]
pub struct XidCounts {
    counts: BTreeMap<(u32, u64), u64>,
}

impl XidCounts {
    /// Counts one event of `code` on GPU `gpu`.
    pub fn record(&mut self, gpu: u32, code: u64) {
        *self.counts.entry((gpu, code)).or_insert(0) += 1;
    }

    /// The counts of GPU `gpu`, sorted by code.
    pub fn for_gpu(&self, gpu: u32) -> Vec<XidCount> {
        self.counts.range((gpu, 0)..=(gpu, u64::MAX)).map(|(&(_, code), &count)| XidCount { code, count }).collect()
    }
}

/// The shared counts: written by the watcher thread, read by `sample()`.
pub type SharedXidCounts = Arc<Mutex<XidCounts>>;

/// Reads the counts of one GPU. A poisoned lock still holds consistent counts
/// (every update is a single insert), so it is read rather than treated as fatal.
pub fn counts_for(counts: &SharedXidCounts, gpu: u32) -> Vec<XidCount> {
    counts.lock().unwrap_or_else(PoisonError::into_inner).for_gpu(gpu)
}

/// The XID code of an event.
pub fn xid_code(error: &XidError) -> u64 {
    match error {
        XidError::Value(code) => *code,
        XidError::Unknown => UNKNOWN_XID,
    }
}

/// The running watcher thread; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct XidWatcher {
    /// Dropped to tell the thread to stop: its next check sees the channel closed.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl XidWatcher {
    /// Starts the thread that registers `gpus` for critical XID events and
    /// counts them into `counts`. Registration happens on the thread because an
    /// NVML event set borrows the `Nvml` handle that the thread owns a share of.
    pub fn spawn(nvml: Arc<Nvml>, gpus: Vec<u32>, counts: SharedXidCounts) -> std::io::Result<Self> {
        Self::spawn_with(move |stop| {
            if let Some(set) = register(&nvml, &gpus) {
                pump(&mut NvmlEvents { set }, &counts, stop);
            }
        })
    }

    /// Runs `body` on the watcher thread; `body` must return soon after the stop
    /// channel it is given closes.
    fn spawn_with(body: impl FnOnce(&mpsc::Receiver<()>) + Send + 'static) -> std::io::Result<Self> {
        let (stop, stop_rx) = mpsc::channel();
        let thread = std::thread::Builder::new().name("nvml-xid-events".to_owned()).spawn(move || body(&stop_rx))?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for XidWatcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("the NVML XID event thread panicked");
        }
    }
}

/// A blocking source of XID events: NVML's event set, or a fake in tests.
trait XidEvents {
    /// Waits up to `timeout_ms` for the next event: `Ok(Some((gpu index, code)))`
    /// for an XID, `Ok(None)` when nothing countable arrived in time.
    fn next(&mut self, timeout_ms: u32) -> Result<Option<(u32, u64)>, NvmlError>;
}

struct NvmlEvents<'n> {
    set: EventSet<'n>,
}

impl XidEvents for NvmlEvents<'_> {
    fn next(&mut self, timeout_ms: u32) -> Result<Option<(u32, u64)>, NvmlError> {
        let event = match self.set.wait(timeout_ms) {
            Ok(event) => event,
            Err(NvmlError::Timeout) => return Ok(None),
            Err(error) => return Err(error),
        };
        let Some(xid) = event.event_data else {
            return Ok(None);
        };
        let code = xid_code(&xid);
        match event.device.index() {
            Ok(gpu) => Ok(Some((gpu, code))),
            Err(error) => {
                tracing::warn!(
                    xid = code,
                    error = %error,
                    "critical XID error on a GPU whose index NVML cannot tell; not counted"
                );
                Ok(None)
            }
        }
    }
}

/// Counts events from `events` into `counts` until `stop` closes (or receives).
fn pump(events: &mut impl XidEvents, counts: &SharedXidCounts, stop: &mpsc::Receiver<()>) {
    let mut last_error: Option<String> = None;
    loop {
        if !matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
            return;
        }
        match events.next(WAIT_SLICE_MS) {
            Ok(Some((gpu, code))) => {
                tracing::warn!(gpu, xid = code, "critical XID error");
                counts.lock().unwrap_or_else(PoisonError::into_inner).record(gpu, code);
                last_error = None;
            }
            Ok(None) => {}
            Err(error) => {
                // Log each new kind of failure once, not once a second.
                let text = error.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "waiting for NVML XID events failed; retrying");
                    last_error = Some(text);
                }
                // The backoff doubles as the stop check, so stopping is not delayed by it.
                if !matches!(stop.recv_timeout(ERROR_BACKOFF), Err(RecvTimeoutError::Timeout)) {
                    return;
                }
            }
        }
    }
}

/// An event set with every GPU of `gpus` that supports critical XID events, or
/// `None` (logged once) when no GPU does.
#[cfg(target_os = "linux")]
fn register<'n>(nvml: &'n Nvml, gpus: &[u32]) -> Option<EventSet<'n>> {
    let mut set = match nvml.create_event_set() {
        Ok(set) => set,
        Err(error) => {
            tracing::warn!(error = %error, "XID events unavailable: cannot create an NVML event set");
            return None;
        }
    };
    let mut registered = Vec::new();
    let mut skipped = Vec::new();
    for &gpu in gpus {
        let device = match nvml.device_by_index(gpu) {
            Ok(device) => device,
            Err(error) => {
                skipped.push(format!("GPU {gpu}: {error}"));
                continue;
            }
        };
        match device.supported_event_types() {
            Ok(types) if types.contains(EventTypes::CRITICAL_XID_ERROR) => {}
            Ok(_) => {
                skipped.push(format!("GPU {gpu}: not supported"));
                continue;
            }
            Err(error) => {
                skipped.push(format!("GPU {gpu}: {error}"));
                continue;
            }
        }
        set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(set) => {
                registered.push(gpu);
                set
            }
            Err(error) => {
                skipped.push(format!("GPU {gpu}: {}", error.error));
                // A failed registration frees the set, so rebuild it with the
                // GPUs that were registered before this one.
                match set_with(nvml, &registered) {
                    Ok(set) => set,
                    Err(error) => {
                        tracing::warn!(error = %error, "XID events unavailable: cannot rebuild the NVML event set");
                        return None;
                    }
                }
            }
        };
    }
    if registered.is_empty() {
        tracing::warn!(
            skipped = ?skipped,
            "XID events not supported on any GPU; XID counts will stay empty"
        );
        return None;
    }
    if !skipped.is_empty() {
        tracing::warn!(skipped = ?skipped, "XID events not supported on some GPUs");
    }
    tracing::info!(gpus = ?registered, "registered for critical XID events");
    Some(set)
}

/// NVML delivers events on Linux only.
#[cfg(not(target_os = "linux"))]
fn register<'n>(_nvml: &'n Nvml, _gpus: &[u32]) -> Option<EventSet<'n>> {
    tracing::warn!("XID events need Linux; XID counts will stay empty");
    None
}

/// A new event set with `gpus` registered for critical XID events.
#[cfg(target_os = "linux")]
fn set_with<'n>(nvml: &'n Nvml, gpus: &[u32]) -> Result<EventSet<'n>, NvmlError> {
    let mut set = nvml.create_event_set()?;
    for &gpu in gpus {
        set = nvml.device_by_index(gpu)?.register_events(EventTypes::CRITICAL_XID_ERROR, set).map_err(|e| e.error)?;
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_per_gpu_and_sorted_by_code() {
        let mut counts = XidCounts::default();
        for (gpu, code) in [(1, 79), (0, 48), (1, 13), (1, 79), (2, 94), (0, u64::MAX)] {
            counts.record(gpu, code);
        }
        assert_eq!(counts.for_gpu(1), [XidCount { code: 13, count: 1 }, XidCount { code: 79, count: 2 }]);
        assert_eq!(counts.for_gpu(0), [XidCount { code: 48, count: 1 }, XidCount { code: u64::MAX, count: 1 }]);
        assert!(counts.for_gpu(3).is_empty());
    }

    #[test]
    fn shared_counts_survive_a_poisoned_lock() {
        let counts = SharedXidCounts::default();
        let writer = Arc::clone(&counts);
        let _ = std::thread::spawn(move || {
            let mut guard = writer.lock().unwrap();
            guard.record(0, 79);
            panic!("poison the lock");
        })
        .join();
        assert!(counts.is_poisoned());
        assert_eq!(counts_for(&counts, 0), [XidCount { code: 79, count: 1 }]);
    }

    /// Replays scripted waits, says when they are used up, then reports nothing
    /// (or keeps failing) forever.
    struct Script {
        waits: std::collections::VecDeque<Result<Option<(u32, u64)>, NvmlError>>,
        drained: Option<mpsc::Sender<()>>,
        then_fail: bool,
    }

    impl XidEvents for Script {
        fn next(&mut self, timeout_ms: u32) -> Result<Option<(u32, u64)>, NvmlError> {
            assert_eq!(timeout_ms, WAIT_SLICE_MS);
            let wait = self.waits.pop_front();
            if self.waits.is_empty()
                && let Some(drained) = self.drained.take()
            {
                drained.send(()).unwrap();
            }
            match wait {
                Some(wait) => wait,
                None if self.then_fail => Err(NvmlError::GpuLost),
                None => Ok(None),
            }
        }
    }

    /// Runs the pump on a watcher thread over `waits`, and drops the watcher
    /// once the pump has taken the last of them.
    fn run_script(waits: Vec<Result<Option<(u32, u64)>, NvmlError>>, then_fail: bool) -> SharedXidCounts {
        let counts = SharedXidCounts::default();
        let shared = Arc::clone(&counts);
        let (drained, drained_rx) = mpsc::channel();
        let watcher = XidWatcher::spawn_with(move |stop| {
            let mut script = Script { waits: waits.into(), drained: Some(drained), then_fail };
            pump(&mut script, &shared, stop);
        })
        .unwrap();
        drained_rx.recv().unwrap();
        // The pump records an event before it next checks for a stop, so the
        // last scripted event is counted; dropping must then stop and join the
        // thread, even in the middle of a backoff.
        drop(watcher);
        counts
    }

    #[test]
    fn the_pump_counts_events_and_stops_on_drop() {
        let counts = run_script(
            vec![Ok(Some((0, 79))), Ok(None), Err(NvmlError::Unknown), Ok(Some((0, 79))), Ok(Some((1, 48)))],
            false,
        );
        assert_eq!(counts_for(&counts, 0), [XidCount { code: 79, count: 2 }]);
        assert_eq!(counts_for(&counts, 1), [XidCount { code: 48, count: 1 }]);
    }

    #[test]
    fn the_pump_stops_while_backing_off_from_failures() {
        let started = std::time::Instant::now();
        let counts = run_script(Vec::new(), true);
        assert!(counts_for(&counts, 0).is_empty());
        // A hang guard, not a timing assertion: stopping must not wait out backoffs forever.
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn unknown_xids_are_counted_under_nvml_code_999() {
        assert_eq!(xid_code(&XidError::Value(79)), 79);
        assert_eq!(xid_code(&XidError::Unknown), UNKNOWN_XID);
    }
}
