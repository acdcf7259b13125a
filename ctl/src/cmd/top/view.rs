//! What `flotctl top` draws: a pure function of the model and the time into a
//! ratatui frame. The fleet screen has the summary line, a row per node and the
//! alerts pane; the node screen a row per GPU. Bars and sparklines are plain
//! block characters, so they read the same in colour and without.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, HighlightSpacing, Paragraph, Row, Table, TableState};

use super::model::{AlertRow, Focus, HISTORY_MS, Link, Model, Node, Screen, buckets, finite};
use crate::output::{GpuView, ago, bytes, celsius, percent};

/// Eight heights, lowest first, for sparklines and per-GPU levels.
const LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
/// Partial blocks by eighths, for horizontal bars.
const EIGHTHS: [char; 7] = ['▏', '▎', '▍', '▌', '▋', '▊', '▉'];
/// Width of a utilisation bar, without its percentage.
const BAR: usize = 10;
/// At most this many per-GPU levels on a node's row.
const MAX_GPU_LEVELS: usize = 16;
/// The marker of the selected row.
const SELECTED: &str = "▶ ";
/// Sparklines bridge gaps up to this long between points (an agent whose
/// interval is longer than a bucket), not longer ones (an agent that was away).
const BRIDGE_MS: i64 = 30_000;
/// The width of the label before a sparkline in the node screen.
const SPARK_LABEL: u16 = 17;

/// Draws the whole screen.
pub fn render(frame: &mut Frame, model: &Model, now_ms: i64) {
    let [summary, body, footer] =
        Layout::vertical([Constraint::Length(1), Constraint::Fill(1), Constraint::Length(1)]).areas(frame.area());
    frame.render_widget(Paragraph::new(summary_line(model, now_ms)), summary);
    match model.screen() {
        Screen::Fleet => fleet(frame, body, model, now_ms),
        Screen::Node(id) => match model.open_node() {
            Some(node) => node_screen(frame, body, model, node, now_ms),
            None => frame.render_widget(
                Paragraph::new(format!("Node {id} is no longer listed by the controller.")).block(Block::bordered()),
                body,
            ),
        },
    }
    frame.render_widget(Paragraph::new(help(model)).style(Style::new().fg(Color::DarkGray)), footer);
}

/// The fleet in one line: nodes, GPUs, alerts, tokens/s and the stream's state.
fn summary_line(model: &Model, now_ms: i64) -> Line<'static> {
    let s = model.summary(now_ms);
    let sep = || Span::raw(" │ ");
    let mut nodes = format!("{}/{} nodes up", s.up, s.nodes);
    if s.down > 0 {
        nodes.push_str(&format!(", {} down", s.down));
    }
    if s.other > 0 {
        nodes.push_str(&format!(", {} other", s.other));
    }
    let mut alerts = format!("{} {} firing", s.firing, if s.firing == 1 { "alert" } else { "alerts" });
    if s.pending > 0 {
        alerts.push_str(&format!(", {} pending", s.pending));
    }
    let alert_style =
        if s.firing > 0 { Style::new().fg(Color::Red).add_modifier(Modifier::BOLD) } else { Style::new() };
    let node_style = if s.down > 0 { Style::new().fg(Color::Red) } else { Style::new() };
    let mut spans = vec![
        Span::styled(" flotilla top", Style::new().add_modifier(Modifier::BOLD)),
        sep(),
        Span::styled(nodes, node_style),
        sep(),
        Span::raw(format!("{} GPUs", s.gpus)),
        sep(),
        Span::styled(alerts, alert_style),
        sep(),
        Span::raw(format!("{} tok/s", tokens_text(s.tokens_per_second))),
        sep(),
    ];
    spans.push(match model.link() {
        Link::Connecting => Span::styled("connecting…", Style::new().fg(Color::Yellow)),
        Link::Live => Span::styled("● live", Style::new().fg(Color::Green)),
        Link::Down { error, retry_at_ms } => Span::styled(
            format!(
                "○ disconnected, retry in {}s: {error}",
                retry_at_ms.saturating_sub(now_ms).max(0).saturating_add(999) / 1000
            ),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
    });
    if let Some(error) = model.poll_error() {
        spans.push(sep());
        spans.push(Span::styled(format!("poll failed: {error}"), Style::new().fg(Color::Red)));
    }
    if model.missed_updates() > 0 {
        spans.push(sep());
        spans.push(Span::raw(format!("{} updates skipped", model.missed_updates())));
    }
    spans.push(sep());
    spans.push(Span::styled(model.controller.clone(), Style::new().fg(Color::DarkGray)));
    Line::from(spans)
}

/// The key help of the current screen.
fn help(model: &Model) -> &'static str {
    match (model.screen(), model.focus()) {
        (Screen::Node(_), _) => " ↑/↓ j/k select GPU · Esc/Backspace back · q quit",
        (Screen::Fleet, Focus::Alerts) => " ↑/↓ j/k move in alerts · Tab/Esc nodes · q quit",
        (Screen::Fleet, Focus::Nodes) => " ↑/↓ j/k move · Enter open node · a/Tab alerts · q quit",
    }
}

fn fleet(frame: &mut Frame, area: Rect, model: &Model, now_ms: i64) {
    // The alerts pane grows with its rows, up to a third of the screen.
    let wanted = u16::try_from(model.alerts().len()).unwrap_or(u16::MAX).saturating_add(3);
    let alerts_height = wanted.clamp(3, (area.height / 3).max(3));
    let [nodes_area, alerts_area] =
        Layout::vertical([Constraint::Fill(1), Constraint::Length(alerts_height)]).areas(area);
    nodes_table(frame, nodes_area, model, now_ms);
    let focused = model.focus() == Focus::Alerts;
    alerts_pane(frame, alerts_area, model.alerts(), focused.then_some(model.selected_alert()), now_ms);
}

fn nodes_table(frame: &mut Frame, area: Rect, model: &Model, now_ms: i64) {
    let id_width = model.nodes().map(|n| n.view.id.chars().count()).max().unwrap_or(0).clamp(4, 24);
    let levels_width = model.nodes().map(|n| n.view.gpus.len()).max().unwrap_or(0).clamp(7, MAX_GPU_LEVELS);
    let widths = [
        Constraint::Length(width(id_width)),
        Constraint::Length(8),
        Constraint::Length(4),
        Constraint::Length(width(BAR + 5)),
        Constraint::Length(width(levels_width)),
        Constraint::Length(5),
        Constraint::Length(21),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Fill(1),
    ];
    let block = Block::bordered().title(format!(" Nodes ({}) ", model.node_count()));
    let trend_width = last_column_width(&widths, block.inner(area).width);
    let header = Row::new([
        "NODE",
        "STATE",
        "GPUS",
        "UTIL",
        "PER GPU",
        "TEMP",
        "VRAM USED / TOTAL",
        "POWER",
        "TOK/S",
        "SEEN",
        "TREND 5m (tok/s, else util)",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows: Vec<Row> = model.nodes().map(|n| node_row(n, now_ms, trend_width)).collect();
    if rows.is_empty() {
        let text = "No nodes are listed yet: start an agent, or wait for the first answer from the controller.";
        frame.render_widget(Paragraph::new(text).block(block), area);
        return;
    }
    let highlight = if model.focus() == Focus::Nodes {
        Style::new().add_modifier(Modifier::REVERSED)
    } else {
        Style::new().add_modifier(Modifier::BOLD)
    };
    let table = Table::new(rows, widths)
        .header(header)
        .block(block)
        .row_highlight_style(highlight)
        .highlight_symbol(SELECTED)
        .highlight_spacing(HighlightSpacing::Always);
    let mut state = TableState::default().with_selected(Some(model.selected()));
    frame.render_stateful_widget(table, area, &mut state);
}

fn node_row(n: &Node, now_ms: i64, trend_width: usize) -> Row<'static> {
    let v = &n.view;
    let util = finite(v.mean_gpu_utilization_ratio);
    let mut levels: String = v.gpus.iter().take(MAX_GPU_LEVELS).map(|g| level(finite(g.utilization_ratio))).collect();
    if v.gpus.len() > MAX_GPU_LEVELS {
        levels.pop();
        levels.push('…');
    }
    let trend = if n.serves_tokens() {
        let values = buckets(&n.history, |p| p.tokens_rate, now_ms, HISTORY_MS, trend_width);
        let max = values.iter().flatten().copied().fold(0.0, f64::max);
        sparkline(&values, max)
    } else {
        let values = buckets(&n.history, |p| p.util, now_ms, HISTORY_MS, trend_width);
        sparkline(&values, 1.0)
    };
    Row::new(vec![
        Cell::from(v.id.clone()),
        Cell::from(Span::styled(v.state.clone(), state_style(&v.state))),
        Cell::from(v.gpus.len().to_string()),
        Cell::from(Span::styled(format!("{} {:>4}", bar(util, BAR), percent(util)), Style::new().fg(Color::Cyan))),
        Cell::from(Span::styled(levels, Style::new().fg(Color::Cyan))),
        temperature(finite(v.max_gpu_temperature_celsius)),
        Cell::from(vram(
            v.gpu_memory_used_bytes,
            v.gpu_memory_total_bytes,
            v.gpus.iter().any(|g| g.memory_used_bytes.is_some()),
        )),
        Cell::from(n.power_watts().map_or_else(|| "-".to_owned(), |w| format!("{w:.0} W"))),
        Cell::from(tokens_text(n.tokens_per_second(now_ms))),
        Cell::from(ago(v.last_seen_unix_ms, now_ms).trim_end_matches(" ago").to_owned()),
        Cell::from(Span::styled(trend, Style::new().fg(Color::Magenta))),
    ])
}

fn alerts_pane(frame: &mut Frame, area: Rect, alerts: &[AlertRow], selected: Option<usize>, now_ms: i64) {
    let firing = alerts.iter().filter(|a| a.firing).count();
    let title = format!(" Alerts: {firing} firing, {} pending ", alerts.len() - firing);
    let mut block = Block::bordered().title(title);
    if selected.is_some() {
        block = block.border_style(Style::new().fg(Color::Yellow));
    }
    if alerts.is_empty() {
        frame.render_widget(Paragraph::new("No alerts are pending or firing.").block(block), area);
        return;
    }
    let rows = alerts.iter().map(|a| {
        let style = if a.firing {
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
        } else {
            Style::new().fg(Color::Yellow)
        };
        Row::new(vec![
            Cell::from(Span::styled(if a.firing { "firing" } else { "pending" }, style)),
            Cell::from(dash(&a.severity)),
            Cell::from(a.name.clone()),
            Cell::from(dash(&a.node)),
            Cell::from(dash(&a.gpu)),
            Cell::from(ago(a.since_ms, now_ms)),
            Cell::from(a.summary.clone()),
        ])
    });
    let header = Row::new(["STATE", "SEVERITY", "ALERT", "NODE", "GPU", "SINCE", "SUMMARY"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    let widths = [
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(24),
        Constraint::Length(16),
        Constraint::Length(3),
        Constraint::Length(8),
        Constraint::Fill(1),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(block)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol(SELECTED)
        .highlight_spacing(HighlightSpacing::Always);
    let mut state = TableState::default().with_selected(selected);
    frame.render_stateful_widget(table, area, &mut state);
}

fn node_screen(frame: &mut Frame, area: Rect, model: &Model, node: &Node, now_ms: i64) {
    let own: Vec<AlertRow> = model.alerts().iter().filter(|a| a.node == node.view.id).cloned().collect();
    let gpus_height = u16::try_from(node.view.gpus.len()).unwrap_or(u16::MAX).saturating_add(3);
    let alerts_height = u16::try_from(own.len()).unwrap_or(u16::MAX).saturating_add(3).clamp(3, 8);
    let [head, gpus, alerts, _] = Layout::vertical([
        Constraint::Length(5),
        Constraint::Max(gpus_height),
        Constraint::Length(alerts_height),
        Constraint::Fill(1),
    ])
    .areas(area);
    node_head(frame, head, node, now_ms);
    gpu_table(frame, gpus, node, model.selected_gpu());
    alerts_pane(frame, alerts, &own, None, now_ms);
}

/// The node's facts and its two sparklines.
fn node_head(frame: &mut Frame, area: Rect, node: &Node, now_ms: i64) {
    let v = &node.view;
    let block = Block::bordered().title(format!(" Node {} ", v.id));
    let spark_width = usize::from(block.inner(area).width.saturating_sub(SPARK_LABEL + 1)).max(1);
    let mut models: Vec<&str> = v.gpus.iter().map(|g| g.model.as_str()).filter(|m| !m.is_empty()).collect();
    models.dedup();
    let state = if v.state_reason.is_empty() { v.state.clone() } else { format!("{} ({})", v.state, v.state_reason) };
    let facts = Line::from(vec![
        Span::raw(" state "),
        Span::styled(state, state_style(&v.state)),
        Span::raw(format!(
            "   host {}   {} GPUs {}   last seen {}",
            dash(&v.hostname),
            v.gpus.len(),
            models.join(", "),
            ago(v.last_seen_unix_ms, now_ms)
        )),
    ]);
    let util = buckets(&node.history, |p| p.util, now_ms, HISTORY_MS, spark_width);
    let util_line = Line::from(vec![
        Span::raw(format!(" util  {:>8}  ", percent(finite(v.mean_gpu_utilization_ratio)))),
        Span::styled(sparkline(&util, 1.0), Style::new().fg(Color::Cyan)),
    ]);
    let rates = buckets(&node.history, |p| p.tokens_rate, now_ms, HISTORY_MS, spark_width);
    let tokens_line = if node.serves_tokens() {
        let max = rates.iter().flatten().copied().fold(0.0, f64::max);
        Line::from(vec![
            Span::raw(format!(" tok/s {:>8}  ", tokens_text(node.tokens_per_second(now_ms)))),
            Span::styled(sparkline(&rates, max), Style::new().fg(Color::Magenta)),
        ])
    } else {
        Line::from(" tok/s        -  no inference server on this node reports generated tokens")
    };
    frame.render_widget(Paragraph::new(vec![facts, util_line, tokens_line]).block(block), area);
}

fn gpu_table(frame: &mut Frame, area: Rect, node: &Node, selected: usize) {
    let block = Block::bordered().title(" GPUs (last 5m in the sparklines above) ");
    if node.view.gpus.is_empty() {
        frame.render_widget(Paragraph::new("This node reports no GPUs.").block(block), area);
        return;
    }
    let header = Row::new([
        "GPU",
        "UTIL",
        "TEMP",
        "MEM °C",
        "VRAM USED / TOTAL",
        "POWER / LIMIT",
        "SM MHZ",
        "ECC UNCORR",
        "XID",
        "REMAP",
        "CLOCKS HELD BY",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let widths = [
        Constraint::Length(3),
        Constraint::Length(width(BAR + 5)),
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Length(21),
        Constraint::Length(13),
        Constraint::Length(6),
        Constraint::Length(10),
        Constraint::Length(12),
        Constraint::Length(7),
        Constraint::Fill(1),
    ];
    let rows = node.view.gpus.iter().map(gpu_row);
    let table = Table::new(rows, widths)
        .header(header)
        .block(block)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol(SELECTED)
        .highlight_spacing(HighlightSpacing::Always);
    let mut state = TableState::default().with_selected(Some(selected));
    frame.render_stateful_widget(table, area, &mut state);
}

fn gpu_row(g: &GpuView) -> Row<'static> {
    let util = finite(g.utilization_ratio);
    let power = match (finite(g.power_watts), finite(g.power_limit_watts)) {
        (Some(p), Some(l)) => format!("{p:.0} / {l:.0} W"),
        (Some(p), None) => format!("{p:.0} W"),
        _ => "-".to_owned(),
    };
    let count = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let ecc = match (g.ecc_uncorrected_volatile_total, g.ecc_uncorrected_aggregate_total) {
        (None, None) => "-".to_owned(),
        (vol, agg) => format!("{}/{}", count(vol), count(agg)),
    };
    let ecc_bad = g.ecc_uncorrected_volatile_total.is_some_and(|n| n > 0);
    let xids: Vec<String> = g.xid_events.iter().map(|x| format!("{}×{}", x.code, x.count)).collect();
    let remap = match (g.remapped_rows_failed, g.remapped_rows_pending) {
        (Some(true), _) => "FAILED",
        (_, Some(true)) => "pending",
        (Some(false), _) | (_, Some(false)) => "ok",
        (None, None) => "-",
    };
    let held = match &g.clock_event_reasons {
        None => "-".to_owned(),
        Some(r) if r.is_empty() => "none".to_owned(),
        Some(r) => r.join(","),
    };
    let alarm = Style::new().fg(Color::Red).add_modifier(Modifier::BOLD);
    Row::new(vec![
        Cell::from(g.index.to_string()),
        Cell::from(Span::styled(format!("{} {:>4}", bar(util, BAR), percent(util)), Style::new().fg(Color::Cyan))),
        temperature(finite(g.temperature_celsius)),
        temperature(finite(g.memory_temperature_celsius)),
        Cell::from(vram(g.memory_used_bytes.unwrap_or(0), g.memory_total_bytes, g.memory_used_bytes.is_some())),
        Cell::from(power),
        Cell::from(g.sm_clock_mhz.map_or_else(|| "-".to_owned(), |m| m.to_string())),
        Cell::from(Span::styled(ecc, if ecc_bad { alarm } else { Style::new() })),
        Cell::from(Span::styled(
            if xids.is_empty() { "none".to_owned() } else { xids.join(",") },
            if xids.is_empty() { Style::new() } else { alarm },
        )),
        Cell::from(Span::styled(remap, if remap == "ok" || remap == "-" { Style::new() } else { alarm })),
        Cell::from(held),
    ])
}

/// A horizontal bar of `width` cells for a ratio in [0, 1], by eighths; blank without one.
pub fn bar(ratio: Option<f64>, width: usize) -> String {
    let Some(r) = finite(ratio) else { return " ".repeat(width) };
    let eighths = (r.clamp(0.0, 1.0) * (width * 8) as f64).round() as usize;
    let mut out = "█".repeat(eighths / 8);
    if let Some(partial) = (eighths % 8).checked_sub(1).and_then(|i| EIGHTHS.get(i)) {
        out.push(*partial);
    }
    let used = out.chars().count();
    out.push_str(&"░".repeat(width.saturating_sub(used)));
    out
}

/// One cell's height for a ratio in [0, 1]; `·` without one.
fn level(ratio: Option<f64>) -> char {
    let Some(r) = finite(ratio) else { return '·' };
    let i = (r.clamp(0.0, 1.0) * LEVELS.len() as f64) as usize;
    LEVELS[i.min(LEVELS.len() - 1)]
}

/// A sparkline of the buckets of [`HISTORY_MS`] against `max`; a gap of up to
/// [`BRIDGE_MS`] between values is bridged with the value before it.
pub fn sparkline(values: &[Option<f64>], max: f64) -> String {
    let bucket_ms = HISTORY_MS / i64::try_from(values.len()).unwrap_or(i64::MAX).max(1);
    // How many empty buckets in a row a bridgeable gap leaves.
    let bridge = usize::try_from(BRIDGE_MS / bucket_ms.max(1)).unwrap_or(usize::MAX);
    let mut filled: Vec<Option<f64>> = values.to_vec();
    let mut last: Option<(usize, f64)> = None;
    for (i, value) in values.iter().enumerate() {
        let Some(v) = *value else { continue };
        if let Some((j, before)) = last
            && i - j - 1 <= bridge
        {
            filled[j + 1..i].iter_mut().for_each(|slot| *slot = Some(before));
        }
        last = Some((i, v));
    }
    filled
        .iter()
        .map(|v| match v {
            None => ' ',
            Some(v) if max > 0.0 && max.is_finite() => level(Some(v / max)),
            Some(_) => LEVELS[0],
        })
        .collect()
}

/// Tokens/s for people: whole numbers from 100, one decimal below.
fn tokens_text(v: Option<f64>) -> String {
    match finite(v) {
        None => "-".to_owned(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn vram(used: u64, total: u64, known: bool) -> String {
    let used = if known { bytes(used) } else { "-".to_owned() };
    let total = if total > 0 { bytes(total) } else { "-".to_owned() };
    format!("{used} / {total}")
}

fn temperature(t: Option<f64>) -> Cell<'static> {
    let style = match t {
        Some(t) if t >= 85.0 => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Some(t) if t >= 75.0 => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    };
    Cell::from(Span::styled(celsius(t), style))
}

fn state_style(state: &str) -> Style {
    match state {
        "up" => Style::new().fg(Color::Green),
        "down" | "revoked" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        "degraded" | "cordoned" | "draining" => Style::new().fg(Color::Yellow),
        _ => Style::new().fg(Color::DarkGray),
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".to_owned() } else { s.to_owned() }
}

fn width(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// The width the table gives its last column (the trend), as ratatui lays it out:
/// the selection marker first, then the columns with one space between them.
fn last_column_width(widths: &[Constraint], inner_width: u16) -> usize {
    let [_, columns] = Layout::horizontal([Constraint::Length(width(SELECTED.chars().count())), Constraint::Fill(0)])
        .areas(Rect::new(0, 0, inner_width, 1));
    let rects = Layout::horizontal(widths.iter().copied()).spacing(1).split(columns);
    rects.last().map_or(0, |r| usize::from(r.width))
}

#[cfg(test)]
mod tests;
