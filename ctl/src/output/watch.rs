//! List commands, once or with `--watch`: fetch, print, wait, again until Ctrl-C.

use std::future::Future;
use std::io::{IsTerminal as _, Write as _};

use flotilla_common::time::now_unix_ms;
use serde::Serialize;

use super::{Columns, reader_gone};
use crate::cli::{Format, WatchArgs};
use crate::client::status_error;

/// Clears a terminal and moves the cursor home, so each frame replaces the last.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// How watched frames follow each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frames {
    /// On a terminal with a table: each frame replaces the last.
    Redraw,
    /// Piped, or JSON/YAML: each frame after the last (one JSON document a line,
    /// YAML documents after `---`, tables separated by a blank line).
    Append,
}

/// Runs `fetch` and prints its answer in `format`; with `--watch`, again every
/// interval until Ctrl-C (exit 0: watching changes nothing). `what` names the call
/// in errors; `table` draws the table formats.
pub async fn list<T, F, Fut>(
    what: &str,
    format: Format,
    watch: WatchArgs,
    mut fetch: F,
    table: impl Fn(&T, Columns) -> String,
) -> anyhow::Result<()>
where
    T: Serialize,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    if !watch.watch {
        let value = fetch().await.map_err(|s| status_error(what, &s))?;
        return super::print_list(format, &value, table);
    }
    let tables = matches!(format, Format::Table | Format::Wide);
    let frames = if tables && std::io::stdout().is_terminal() { Frames::Redraw } else { Frames::Append };
    let heading = format!("every {}: {what}", humantime::format_duration(watch.interval));
    let stop = flotilla_common::shutdown::on_signal();
    loop {
        let answer = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            answer = fetch() => answer,
        };
        match answer {
            Ok(value) => {
                let text = frame(format, &value, &table, frames, &heading, now_unix_ms())?;
                let mut out = std::io::stdout().lock();
                match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                    Err(error) if reader_gone(&error) => return Ok(()),
                    other => other?,
                }
            }
            // A controller restarting, slow or rate-limiting is no reason to stop watching.
            Err(status) if retryable(status.code()) => {
                eprintln!("flotctl: {} (retrying)", status_error(what, &status));
            }
            Err(status) => return Err(status_error(what, &status)),
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(watch.interval) => {}
        }
    }
}

/// Whether a watch keeps going after a call failed with `code`.
fn retryable(code: tonic::Code) -> bool {
    matches!(code, tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::ResourceExhausted)
}

/// One watched frame, ready to write.
fn frame<T: Serialize>(
    format: Format,
    value: &T,
    table: &impl Fn(&T, Columns) -> String,
    frames: Frames,
    heading: &str,
    now_ms: i64,
) -> anyhow::Result<String> {
    Ok(match (format, frames) {
        // One compact document a line, so `jq` and line readers take frames one by one.
        (Format::Json, _) => format!("{}\n", serde_json::to_string(value)?),
        (Format::Yaml, _) => format!("---\n{}", serde_yaml_ng::to_string(value)?),
        (Format::Table | Format::Wide, Frames::Redraw) => {
            let at = super::rfc3339(now_ms);
            format!("{CLEAR}{heading} ({at}; Ctrl-C stops)\n\n{}\n", table(value, Columns::of(format)))
        }
        (Format::Table | Format::Wide, Frames::Append) => format!("{}\n\n", table(value, Columns::of(format))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The list type the frames carry, as `list` hands it to a table function.
    #[allow(clippy::ptr_arg)]
    fn table(v: &Vec<u32>, columns: Columns) -> String {
        let extra = if columns == Columns::Wide { " EXTRA" } else { "" };
        format!("N{extra}\n{}", v.iter().map(u32::to_string).collect::<Vec<_>>().join("\n"))
    }

    #[test]
    fn json_frames_are_one_document_a_line() {
        let text = frame(Format::Json, &vec![1, 2], &table, Frames::Append, "h", 0).unwrap();
        assert_eq!(text, "[1,2]\n");
    }

    #[test]
    fn yaml_frames_are_separate_documents() {
        let text = frame(Format::Yaml, &vec![1], &table, Frames::Append, "h", 0).unwrap();
        assert_eq!(text, "---\n- 1\n");
    }

    #[test]
    fn piped_tables_are_separated_by_a_blank_line_and_never_clear_the_screen() {
        let text = frame(Format::Table, &vec![1], &table, Frames::Append, "h", 0).unwrap();
        assert_eq!(text, "N\n1\n\n");
        let wide = frame(Format::Wide, &vec![1], &table, Frames::Append, "h", 0).unwrap();
        assert_eq!(wide, "N EXTRA\n1\n\n");
    }

    #[test]
    fn a_terminal_frame_replaces_the_last_and_says_how_to_stop() {
        let text = frame(Format::Table, &vec![1], &table, Frames::Redraw, "every 2s: list nodes", 0).unwrap();
        assert!(text.starts_with(CLEAR), "{text:?}");
        assert!(text.contains("every 2s: list nodes (1970-01-01T00:00:00Z; Ctrl-C stops)\n\nN\n1\n"), "{text:?}");
    }

    #[test]
    fn only_passing_trouble_keeps_a_watch_going() {
        assert!(retryable(tonic::Code::Unavailable));
        assert!(retryable(tonic::Code::ResourceExhausted));
        assert!(!retryable(tonic::Code::PermissionDenied));
        assert!(!retryable(tonic::Code::InvalidArgument));
    }
}
