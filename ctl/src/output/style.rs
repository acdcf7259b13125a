//! Colour in tables: decided once per run from `--color`, `NO_COLOR` and whether
//! stdout is a terminal, so that piped output never carries escape codes by accident.

use std::ffi::OsStr;
use std::io::IsTerminal as _;
use std::sync::OnceLock;

use comfy_table::{Attribute, Cell, Color, Table};

use crate::cli::ColorChoice;

/// The decision for this process; unset (no colour) until [`init`] runs, as in unit tests.
static ENABLED: OnceLock<bool> = OnceLock::new();

/// Whether to colour. An explicit `--color always|never` wins; `auto` colours only a
/// terminal and, as <https://no-color.org> asks, not when `NO_COLOR` is set to anything
/// but the empty string.
pub fn decide(choice: ColorChoice, no_color: Option<&OsStr>, stdout_is_terminal: bool) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => stdout_is_terminal && no_color.is_none_or(OsStr::is_empty),
    }
}

/// Decides for this process from the flag, the environment and stdout; the first call wins.
pub fn init(choice: ColorChoice) {
    let enabled = decide(choice, std::env::var_os("NO_COLOR").as_deref(), std::io::stdout().is_terminal());
    // A second call (none is made) would keep the first decision, which is what we want.
    let _ = ENABLED.set(enabled);
}

/// Whether this run colours its tables.
pub fn enabled() -> bool {
    ENABLED.get().copied().unwrap_or(false)
}

/// A borderless table with a bold header when `color`, and plain otherwise.
///
/// comfy-table would style cells on any terminal by itself; it is told either way so
/// that `NO_COLOR` and `--color` decide, not its own terminal check.
pub fn styled_table(header: &[&str], color: bool) -> Table {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    if color {
        t.enforce_styling();
    } else {
        t.force_no_tty();
    }
    t.set_header(header.iter().map(|h| Cell::new(h).add_attribute(Attribute::Bold)));
    t
}

/// A cell whose colour follows the health its word means: green for good, yellow for
/// in between, red for bad; other words stay plain. Colour only shows in a styled table.
pub fn state_cell(word: &str) -> Cell {
    cell_colored_by(word, word)
}

/// A cell showing `text` in the colour of the state `word` (e.g. a rollout's
/// `#5 progressing 1/2` in the colour of `progressing`).
pub fn cell_colored_by(text: &str, word: &str) -> Cell {
    let cell = Cell::new(text);
    match state_color(word) {
        Some(color) => cell.fg(color),
        None => cell,
    }
}

/// The colour of a state, severity or verdict word, when it has one.
pub fn state_color(word: &str) -> Option<Color> {
    // The first word decides: "degraded (gpu 3 hot)" is yellow.
    let head = word.split([' ', '(']).next().unwrap_or_default();
    match head {
        "up" | "ok" | "healthy" | "running" | "active" | "succeeded" | "stable" | "resolved" | "pass" => {
            Some(Color::Green)
        }
        "degraded" | "cordoned" | "draining" | "pending" | "progressing" | "paused" | "starting" | "warning"
        | "spent" | "unknown" => Some(Color::Yellow),
        "down" | "revoked" | "firing" | "critical" | "failed" | "error" | "unhealthy" | "rolled_back" | "aborted"
        | "expired" | "dead" | "exited" | "fail" => Some(Color::Red),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_flag_wins_and_auto_follows_the_terminal_and_no_color() {
        let set = Some(OsStr::new("1"));
        let empty = Some(OsStr::new(""));
        assert!(decide(ColorChoice::Always, set, false), "--color always beats NO_COLOR and a pipe");
        assert!(!decide(ColorChoice::Never, None, true));
        assert!(decide(ColorChoice::Auto, None, true));
        assert!(!decide(ColorChoice::Auto, None, false), "piped: plain");
        assert!(!decide(ColorChoice::Auto, set, true), "NO_COLOR=1 on a terminal: plain");
        assert!(decide(ColorChoice::Auto, empty, true), "an empty NO_COLOR counts as unset");
    }

    #[test]
    fn a_plain_table_has_no_escape_codes_and_a_styled_one_has_them() {
        for color in [false, true] {
            let mut t = styled_table(&["NODE", "STATE"], color);
            t.add_row(vec![Cell::new("gpu-a"), state_cell("down")]);
            let text = t.to_string();
            assert_eq!(text.contains('\x1b'), color, "color={color}: {text:?}");
            assert!(text.contains("gpu-a") && text.contains("down"), "{text}");
        }
    }

    #[test]
    fn states_are_coloured_by_what_they_mean() {
        assert_eq!(state_color("up"), Some(Color::Green));
        assert_eq!(state_color("degraded (gpu 3 hot)"), Some(Color::Yellow));
        assert_eq!(state_color("firing"), Some(Color::Red));
        assert_eq!(state_color("gpu-a"), None);
        assert_eq!(state_color(""), None);
    }
}
