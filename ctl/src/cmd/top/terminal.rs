//! The terminal `flotctl top` draws on: raw mode and the alternate screen for as
//! long as a [`Session`] lives. Dropping it restores the terminal, and so does a
//! panic (through a hook installed once), so no exit path leaves the user's
//! shell in raw mode.

use std::io::{Stdout, stdout};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use crossterm::cursor::Show;
use crossterm::execute;
use crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;

/// Whether the terminal is in `top`'s mode and needs restoring.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

/// The terminal in raw mode on the alternate screen; restored on drop.
pub struct Session {
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
    _restore: Restore,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// Puts the terminal in raw mode on the alternate screen.
    pub fn enter() -> anyhow::Result<Self> {
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                // Restore first, so that the panic message lands on the user's screen.
                restore();
                previous(info);
            }));
        });
        enable_raw_mode().context("put the terminal in raw mode")?;
        ACTIVE.store(true, Ordering::SeqCst);
        // From here on, an early return drops this and restores the terminal.
        let restore_on_drop = Restore;
        execute!(stdout(), EnterAlternateScreen).context("switch to the alternate screen")?;
        let terminal = Terminal::new(CrosstermBackend::new(stdout())).context("set up the terminal")?;
        Ok(Self { terminal, _restore: restore_on_drop })
    }
}

/// Restores the terminal when dropped.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        restore();
    }
}

/// Leaves raw mode and the alternate screen and shows the cursor, once.
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        // Nothing more can be done if these fail: the process is on its way out.
        let _ = disable_raw_mode();
        let _ = execute!(stdout(), LeaveAlternateScreen, Show);
    }
}
