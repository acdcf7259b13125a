//! `flotctl top`: a live dashboard of the fleet in the terminal. A summary line,
//! a row per node with GPU bars and a sparkline, the alerts pane, and a node's
//! per-GPU view; fed by `WatchTelemetry` and a poll of `ListNodes`/`ListAlerts`.
//!
//! The pieces: [`model`] is the pure state, [`view`] draws it, [`feed`] talks to
//! the controller, [`terminal`] owns raw mode; this file is the event loop.

mod feed;
mod model;
mod terminal;
mod view;

use std::io::IsTerminal as _;
use std::sync::Arc;

use anyhow::Context as _;
use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use flotilla_common::time::now_unix_ms;
use futures::StreamExt as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Duration, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use self::feed::Update;
use self::model::{Flow, Key, Model};
use crate::UsageError;
use crate::cli::TopArgs;
use crate::client::connect;
use crate::context::Connection;

/// How often the screen is redrawn without news: the ages and sparklines move on.
const TICK: Duration = Duration::from_secs(1);
/// Telemetry redraws the screen at most this often; keys redraw it at once.
const FRAME: Duration = Duration::from_millis(100);

pub async fn run(args: TopArgs, conn: &Connection) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(UsageError(
            "flotctl top needs an interactive terminal; for scripts and pipes use `flotctl nodes ls --watch` or `flotctl nodes ls -o json`"
                .to_owned(),
        )
        .into());
    }
    // Connect before touching the terminal, so that a wrong address or
    // certificate is an ordinary one-line error.
    let client = connect(conn).await?;
    let cancel = CancellationToken::new();
    let (tx, rx) = mpsc::channel(1024);
    let list_now = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    tasks.spawn(
        feed::watch(client.clone(), tx.clone(), cancel.child_token()).instrument(tracing::info_span!("top_watch")),
    );
    tasks.spawn(
        feed::poll(client, args.refresh, list_now.clone(), tx, cancel.child_token())
            .instrument(tracing::info_span!("top_poll")),
    );
    let result = match terminal::Session::enter() {
        Ok(mut session) => event_loop(&mut session, Model::new(conn.controller.clone()), rx, &list_now).await,
        Err(e) => Err(e),
    };
    // The session is gone and the terminal restored; stop the feed and wait for it.
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    result
}

/// Draws, then waits for a key, an update, a tick or a signal; until `q`.
async fn event_loop(
    session: &mut terminal::Session,
    mut model: Model,
    mut updates: mpsc::Receiver<Update>,
    list_now: &Notify,
) -> anyhow::Result<()> {
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut terminate = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("listen for SIGHUP")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    // When the screen is next due (`None`: nothing new to show), and when it was last drawn.
    let mut due = Some(Instant::now());
    let mut drawn = Instant::now();
    loop {
        if due.is_some_and(|d| d <= Instant::now()) {
            session.terminal.draw(|frame| view::render(frame, &model, now_unix_ms())).context("draw the screen")?;
            (due, drawn) = (None, Instant::now());
        }
        tokio::select! {
            event = keys.next() => match event {
                Some(Ok(Event::Key(key))) => {
                    if let Some(key) = map_key(key)
                        && model.on_key(key) == Flow::Quit
                    {
                        return Ok(());
                    }
                    // A key is answered at once.
                    due = Some(Instant::now());
                }
                // Resizing (or anything else) redraws.
                Some(Ok(_)) => due = Some(Instant::now()),
                Some(Err(e)) => return Err(e).context("read the terminal"),
                None => return Ok(()),
            },
            update = updates.recv() => {
                let Some(update) = update else { return Ok(()) };
                apply(&mut model, update);
                // Take whatever else is queued before drawing again.
                while let Ok(update) = updates.try_recv() {
                    apply(&mut model, update);
                }
                if model.needs_listing() {
                    list_now.notify_one();
                }
                due = due.or(Some(drawn + FRAME));
            }
            () = tokio::time::sleep_until(due.unwrap_or(drawn)), if due.is_some() => {}
            _ = tick.tick() => due = due.or(Some(Instant::now())),
            _ = terminate.recv() => return Ok(()),
            _ = hangup.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        }
    }
}

fn apply(model: &mut Model, update: Update) {
    match update {
        Update::Telemetry { node_id, batch } => model.apply_telemetry(&node_id, batch),
        Update::MissedUpdates(n) => model.add_missed_updates(n),
        Update::Link(link) => model.set_link(link),
        Update::Nodes(nodes) => model.apply_nodes(nodes),
        Update::Alerts(alerts) => model.apply_alerts(&alerts),
        Update::Poll(error) => model.set_poll_error(error),
    }
}

/// The model's key for a terminal key press; `None` for keys `top` ignores.
fn map_key(key: KeyEvent) -> Option<Key> {
    if key.kind == KeyEventKind::Release {
        return None;
    }
    if key.modifiers.contains(KeyModifiers::CONTROL) {
        return matches!(key.code, KeyCode::Char('c' | 'd')).then_some(Key::Quit);
    }
    Some(match key.code {
        KeyCode::Up | KeyCode::Char('k') => Key::Up,
        KeyCode::Down | KeyCode::Char('j') => Key::Down,
        KeyCode::Home | KeyCode::Char('g') => Key::Home,
        KeyCode::End | KeyCode::Char('G') => Key::End,
        KeyCode::Enter | KeyCode::Right | KeyCode::Char('l') => Key::Enter,
        KeyCode::Esc | KeyCode::Backspace | KeyCode::Left | KeyCode::Char('h') => Key::Back,
        KeyCode::Tab | KeyCode::BackTab => Key::Tab,
        KeyCode::Char('a') => Key::Alerts,
        KeyCode::Char('q') => Key::Quit,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_the_model() {
        let press = |code| KeyEvent::new(code, KeyModifiers::NONE);
        assert_eq!(map_key(press(KeyCode::Char('j'))), Some(Key::Down));
        assert_eq!(map_key(press(KeyCode::Enter)), Some(Key::Enter));
        assert_eq!(map_key(press(KeyCode::Backspace)), Some(Key::Back));
        assert_eq!(map_key(press(KeyCode::Char('x'))), None);
        assert_eq!(map_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Some(Key::Quit));
        let mut release = press(KeyCode::Char('q'));
        release.kind = KeyEventKind::Release;
        assert_eq!(map_key(release), None);
    }
}
