//! Snapshots of `top`'s screens: a fixed fleet drawn on ratatui's `TestBackend`,
//! compared as text, line by line, then walked through with keys.

use flotilla_proto::pb;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::style::Color;

use super::*;
use crate::cmd::top::model::Key;

/// 2023-11-14T22:13:20Z: every time below is relative to it.
const NOW: i64 = 1_700_000_000_000;
const GIB: u64 = 1 << 30;
const TOKENS: &str = "flotilla_inference_generation_tokens_total";

fn gpu_sample(index: u32, util: f64, temp: f64, used_gib: u64, watts: f64) -> pb::GpuSample {
    pb::GpuSample {
        index,
        utilization_ratio: Some(util),
        temperature_celsius: Some(temp),
        memory_used_bytes: Some(used_gib * GIB),
        memory_total_bytes: Some(80 * GIB),
        power_watts: Some(watts),
        power_limit_watts: Some(700.0),
        ..Default::default()
    }
}

fn inventory(gpus: u32) -> pb::Inventory {
    pb::Inventory {
        hostname: "host".into(),
        gpus: (0..gpus)
            .map(|i| pb::GpuInfo {
                index: i,
                uuid: format!("GPU-{i}"),
                model: "NVIDIA H100".into(),
                memory_total_bytes: 80 * GIB,
            })
            .collect(),
        ..Default::default()
    }
}

/// gpu-a: up, four busy GPUs, tokens/s rising from 10 to 110 over the last
/// minute (one batch every 10 s). gpu-b: down, listed GPUs without samples. gpu-c: degraded, no GPUs.
/// One firing and one pending alert.
fn fleet() -> Model {
    let mut m = Model::new("https://ctl.test:7443");
    let node = |id: &str, state: pb::NodeState, gpus: u32| pb::Node {
        id: id.into(),
        state: state as i32,
        state_reason: if state == pb::NodeState::Down { "no heartbeat for 42s".into() } else { String::new() },
        inventory: Some(inventory(gpus)),
        last_seen_unix_ms: if state == pb::NodeState::Down { NOW - 42_000 } else { NOW - 1_000 },
        ..Default::default()
    };
    m.apply_nodes(vec![
        node("gpu-a", pb::NodeState::Up, 4),
        node("gpu-b", pb::NodeState::Down, 2),
        node("gpu-c", pb::NodeState::Degraded, 0),
    ]);
    for step in 0..=6 {
        let at = NOW - 60_000 + step * 10_000;
        let mut gpus = vec![
            gpu_sample(0, 0.1, 41.0, 10, 120.0),
            gpu_sample(1, 0.5, 62.0, 40, 350.0),
            gpu_sample(2, 0.9, 78.0, 70, 600.0),
            gpu_sample(3, 1.0, 88.0, 79, 690.0),
        ];
        gpus[3].xid_events = vec![pb::XidCount { code: 79, count: 1 }];
        gpus[3].ecc_uncorrected_volatile_total = Some(2);
        gpus[3].ecc_uncorrected_aggregate_total = Some(3);
        gpus[3].remapped_rows_pending = Some(true);
        gpus[3].clock_event_reasons = Some(0x20);
        let tokens = pb::Sample {
            name: TOKENS.into(),
            labels: [("endpoint".to_owned(), "llama".to_owned())].into(),
            value: (step * step * 100) as f64,
        };
        let batch = pb::TelemetryBatch {
            seq: step as u64 + 1,
            created_unix_ms: at,
            gpus,
            samples: vec![tokens],
            ..Default::default()
        };
        m.apply_telemetry("gpu-a", batch);
    }
    let alert = |id: &str, state: pb::AlertState, gpu: &str, since: i64, summary: &str| pb::Alert {
        id: id.into(),
        name: id.into(),
        state: state as i32,
        labels: [
            ("node".to_owned(), "gpu-a".to_owned()),
            ("gpu".to_owned(), gpu.to_owned()),
            ("severity".to_owned(), "critical".to_owned()),
        ]
        .into(),
        annotations: [("summary".to_owned(), summary.to_owned())].into(),
        active_since_unix_ms: since,
        firing_since_unix_ms: if state == pb::AlertState::Firing { since } else { 0 },
        ..Default::default()
    };
    m.apply_alerts(&[
        alert("GPUMemoryNearlyFull", pb::AlertState::Pending, "3", NOW - 5_000, "GPU 3 VRAM at 99%"),
        alert("GPUHighTemperature", pb::AlertState::Firing, "3", NOW - 120_000, "GPU 3 on gpu-a at 88°C"),
    ]);
    m.set_link(Link::Live);
    m
}

fn draw(model: &Model, width: u16, height: u16) -> Buffer {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| render(f, model, NOW)).unwrap();
    terminal.backend().buffer().clone()
}

/// The buffer's text, a line per row, trailing blanks cut.
fn text(buffer: &Buffer) -> Vec<String> {
    let width = usize::from(buffer.area.width);
    buffer
        .content
        .chunks(width)
        .map(|row| row.iter().map(|c| c.symbol()).collect::<String>().trim_end().to_owned())
        .collect()
}

fn assert_screen(buffer: &Buffer, expected: &[&str]) {
    let got = text(buffer);
    assert_eq!(got, expected, "\n{}\n", got.join("\n"));
}

#[test]
fn the_fleet_screen() {
    let model = fleet();
    let screen = draw(&model, 160, 14);
    assert_screen(
        &screen,
        &[
            " flotilla top │ 1/3 nodes up, 1 down, 1 other │ 6 GPUs │ 1 alert firing, 1 pending │ 110 tok/s │ ● live │ https://ctl.test:7443",
            "┌ Nodes (3) ───────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┐",
            "│  NODE  STATE    GPUS UTIL            PER GPU TEMP  VRAM USED / TOTAL     POWER   TOK/S   SEEN     TREND 5m (tok/s, else util)                                │",
            "│▶ gpu-a up       4    ██████▎░░░  62% ▁▅██    88°C  199.0 GiB / 320.0 GiB 1760 W  110     1s                                                        ▁▁▃▃▄▄▆▆▇█│",
            "│  gpu-b down     2                  - ··      -     - / 160.0 GiB         -       -       42s                                                                 │",
            "│  gpu-c degraded 0                  -         -     - / -                 -       -       1s                                                                  │",
            "│                                                                                                                                                              │",
            "│                                                                                                                                                              │",
            "└──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘",
            "┌ Alerts: 1 firing, 1 pending ─────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┐",
            "│  STATE   SEVERITY ALERT                    NODE             GPU SINCE    SUMMARY                                                                             │",
            "│  firing  critical GPUHighTemperature       gpu-a            3   2m ago   GPU 3 on gpu-a at 88°C                                                              │",
            "└──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘",
            " ↑/↓ j/k move · Enter open node · a/Tab alerts · q quit",
        ],
    );
    // The summary names what matters in colour: the down node, the firing alert.
    let line = text(&screen)[0].clone();
    let column = |needle: &str| u16::try_from(line[..line.find(needle).unwrap()].chars().count()).unwrap();
    assert_eq!(screen[(column("1 down"), 0)].fg, Color::Red);
    assert_eq!(screen[(column("1 alert firing"), 0)].fg, Color::Red);
    assert_eq!(screen[(column("● live"), 0)].fg, Color::Green);
}

#[test]
fn walking_into_a_node_and_back() {
    let mut model = fleet();
    model.on_key(Key::Enter);
    for _ in 0..5 {
        model.on_key(Key::Down);
    }
    let screen = draw(&model, 160, 20);
    assert_screen(
        &screen,
        &[
            " flotilla top │ 1/3 nodes up, 1 down, 1 other │ 6 GPUs │ 1 alert firing, 1 pending │ 110 tok/s │ ● live │ https://ctl.test:7443",
            "┌ Node gpu-a ──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┐",
            "│ state up   host host   4 GPUs NVIDIA H100   last seen 1s ago                                                                                                 │",
            "│ util       62%                                                                                                                 ▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆▆ │",
            "│ tok/s      110                                                                                                                      ▁▁▁▁▁▃▃▃▃▄▄▄▄▄▆▆▆▆▆▇▇▇▇█ │",
            "└──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘",
            "┌ GPUs (last 5m in the sparklines above) ──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┐",
            "│  GPU UTIL            TEMP  MEM °C VRAM USED / TOTAL     POWER / LIMIT SM MHZ ECC UNCORR XID          REMAP   CLOCKS HELD BY                                  │",
            "│  0   █░░░░░░░░░  10% 41°C  -      10.0 GiB / 80.0 GiB   120 / 700 W   -      -          none         -       -                                               │",
            "│  1   █████░░░░░  50% 62°C  -      40.0 GiB / 80.0 GiB   350 / 700 W   -      -          none         -       -                                               │",
            "│  2   █████████░  90% 78°C  -      70.0 GiB / 80.0 GiB   600 / 700 W   -      -          none         -       -                                               │",
            "│▶ 3   ██████████ 100% 88°C  -      79.0 GiB / 80.0 GiB   690 / 700 W   -      2/3        79×1         pending sw_thermal_slowdown                             │",
            "└──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘",
            "┌ Alerts: 1 firing, 1 pending ─────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┐",
            "│  STATE   SEVERITY ALERT                    NODE             GPU SINCE    SUMMARY                                                                             │",
            "│  firing  critical GPUHighTemperature       gpu-a            3   2m ago   GPU 3 on gpu-a at 88°C                                                              │",
            "│  pending critical GPUMemoryNearlyFull      gpu-a            3   5s ago   GPU 3 VRAM at 99%                                                                   │",
            "└──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘",
            "",
            " ↑/↓ j/k select GPU · Esc/Backspace back · q quit",
        ],
    );

    model.on_key(Key::Back);
    model.on_key(Key::Down);
    let screen = text(&draw(&model, 160, 14));
    assert!(screen[3].starts_with("│  gpu-a") && screen[4].starts_with("│▶ gpu-b down"), "{}", screen.join("\n"));
    model.on_key(Key::Enter);
    let screen = text(&draw(&model, 160, 14));
    assert!(screen[1].starts_with("┌ Node gpu-b ") && screen[2].contains("down (no heartbeat for 42s)"));
    assert!(screen[4].contains("tok/s        -  no inference server"), "{}", screen.join("\n"));
}

#[test]
fn the_alerts_pane_takes_the_keys() {
    let mut model = fleet();
    model.on_key(Key::Alerts);
    model.on_key(Key::Down);
    let screen = text(&draw(&model, 100, 20));
    let alerts: Vec<&String> = screen.iter().skip_while(|l| !l.starts_with("┌ Alerts")).collect();
    assert!(alerts[2].starts_with("│  firing") && alerts[3].starts_with("│▶ pending"), "{}", screen.join("\n"));
    assert_eq!(screen.last().unwrap(), " ↑/↓ j/k move in alerts · Tab/Esc nodes · q quit");
    model.on_key(Key::Back);
    model.on_key(Key::Enter);
    assert_eq!(model.screen(), &Screen::Node("gpu-a".into()), "Esc gave the keys back to the nodes");
}

#[test]
fn disconnected_and_empty() {
    let mut model = Model::new("https://ctl.test:7443");
    model.set_link(Link::Down { error: "connection refused".into(), retry_at_ms: NOW + 1_500 });
    model.set_poll_error(Some("list nodes: unavailable".into()));
    let screen = text(&draw(&model, 120, 9));
    assert_screen(
        &draw(&model, 120, 9),
        &[
            " flotilla top │ 0/0 nodes up │ 0 GPUs │ 0 alerts firing │ - tok/s │ ○ disconnected, retry in 2s: connection refused │ po",
            "┌ Nodes (0) ───────────────────────────────────────────────────────────────────────────────────────────────────────────┐",
            "│No nodes are listed yet: start an agent, or wait for the first answer from the controller.                            │",
            "│                                                                                                                      │",
            "└──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘",
            "┌ Alerts: 0 firing, 0 pending ─────────────────────────────────────────────────────────────────────────────────────────┐",
            "│No alerts are pending or firing.                                                                                      │",
            "└──────────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘",
            " ↑/↓ j/k move · Enter open node · a/Tab alerts · q quit",
        ],
    );
    assert!(screen[0].contains("○ disconnected, retry in 2s: connection refused"));
}

#[test]
fn no_data_and_no_size_makes_it_panic() {
    let mut model = fleet();
    let mut weird = pb::GpuSample { index: 0, ..Default::default() };
    weird.utilization_ratio = Some(f64::NAN);
    weird.temperature_celsius = Some(f64::INFINITY);
    weird.power_watts = Some(f64::NEG_INFINITY);
    weird.memory_total_bytes = Some(0);
    weird.memory_used_bytes = Some(u64::MAX);
    let mut big = pb::Node { id: "n".repeat(300), inventory: Some(inventory(200)), ..Default::default() };
    big.latest = Some(pb::TelemetryBatch {
        created_unix_ms: i64::MAX,
        gpus: vec![weird, gpu_sample(7, 7.5, -40.0, u64::MAX / GIB, 1e300)],
        samples: vec![
            pb::Sample { name: TOKENS.into(), value: f64::NAN, ..Default::default() },
            pb::Sample { name: TOKENS.into(), value: 1e308, ..Default::default() },
        ],
        ..Default::default()
    });
    model.apply_nodes(vec![big.clone(), pb::Node { id: "gpu-a".into(), ..Default::default() }]);
    model.apply_telemetry("gpu-a", pb::TelemetryBatch { created_unix_ms: i64::MIN, ..Default::default() });
    model.apply_telemetry(&big.id, pb::TelemetryBatch { created_unix_ms: i64::MAX, ..Default::default() });
    model.apply_alerts(&[pb::Alert {
        state: pb::AlertState::Firing as i32,
        active_since_unix_ms: i64::MIN,
        ..Default::default()
    }]);
    for key in [None, Some(Key::End), Some(Key::Enter), Some(Key::End)] {
        if let Some(key) = key {
            model.on_key(key);
        }
        for (w, h) in [(0, 0), (1, 1), (7, 3), (40, 6), (80, 24), (300, 100)] {
            draw(&model, w, h);
        }
    }
}

#[test]
fn bars_and_sparklines() {
    assert_eq!(bar(Some(0.0), 4), "░░░░");
    assert_eq!(bar(Some(0.5), 4), "██░░");
    assert_eq!(bar(Some(0.55), 4), "██▎░");
    assert_eq!(bar(Some(7.0), 4), "████");
    assert_eq!(bar(Some(f64::NAN), 4), "    ");
    assert_eq!(bar(None, 0), "");
    assert_eq!(
        sparkline(&[None, Some(0.0), Some(0.5), Some(1.0), None], 1.0),
        " ▁▅█ ",
        "only gaps between values are bridged"
    );
    assert_eq!(sparkline(&[Some(3.0), Some(f64::NAN)], 0.0), "▁▁", "no scale: the floor");
    // Buckets of a minute: no gap is bridged. Of 30 s: a gap of one bucket is.
    assert_eq!(sparkline(&[Some(1.0), None, Some(1.0), None, None], 1.0), "█ █  ");
    let ten: Vec<Option<f64>> = [Some(0.25), None, Some(0.75), None, None, None, None, None, None, None].into();
    assert_eq!(sparkline(&ten, 1.0), "▃▃▇       ");
    let ten: Vec<Option<f64>> = [Some(0.25), None, None, Some(0.75), None, None, None, None, None, None].into();
    assert_eq!(sparkline(&ten, 1.0), "▃  ▇      ");
}
