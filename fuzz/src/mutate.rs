//! Deterministic input mutation for the stable smoke run: what libFuzzer does
//! without its coverage feedback. Bit flips, interesting bytes, insertions,
//! deletions, duplications, truncations, splices with other inputs, tokens of
//! the target's grammar, and now and then plain random bytes, all from a
//! fixed-seed generator so that every run tries exactly the same inputs (a
//! failure reproduces by its index).

/// SplitMix64: tiny, fast, and the same sequence on every platform forever.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
}

/// Bytes that break parsers more often than random ones: boundaries of signed
/// and unsigned integers, NUL, newline, quote, backslash, non-UTF-8 lead bytes.
const INTERESTING: [u8; 14] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0xfe, b'\n', b'\r', b'"', b'\\', b'{', b'[', 0xc0, 0xf4];

/// Makes one mutated input from `input`, using `others` for splices and
/// `tokens` (the target's grammar) for insertions; never longer than `max_len`.
pub fn mutate(rng: &mut Rng, input: &[u8], others: &[Vec<u8>], tokens: &[&[u8]], max_len: usize) -> Vec<u8> {
    // One input in 64 is plain noise, for the paths no seed leads to.
    if rng.below(64) == 0 {
        let len = rng.below(max_len.min(4096) + 1);
        return (0..len).map(|_| rng.byte()).collect();
    }
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        mutate_once(rng, &mut out, others, tokens);
    }
    out.truncate(max_len);
    out
}

fn mutate_once(rng: &mut Rng, out: &mut Vec<u8>, others: &[Vec<u8>], tokens: &[&[u8]]) {
    let len = out.len();
    match rng.below(11) {
        // Flip one bit.
        0 if len > 0 => {
            let i = rng.below(len);
            out[i] ^= 1 << rng.below(8);
        }
        // Overwrite a byte with an interesting one.
        1 if len > 0 => {
            let i = rng.below(len);
            out[i] = INTERESTING[rng.below(INTERESTING.len())];
        }
        // Add or subtract a little (lengths, varints, digits).
        2 if len > 0 => {
            let i = rng.below(len);
            let delta = 1 + rng.below(16) as u8;
            out[i] = if rng.below(2) == 0 { out[i].wrapping_add(delta) } else { out[i].wrapping_sub(delta) };
        }
        // Insert a few random bytes.
        3 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            out.splice(at..at, bytes);
        }
        // Delete a range.
        4 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            out.drain(at..at + n);
        }
        // Duplicate a range somewhere else (repeated fields, nesting).
        5 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(256));
            let chunk = out[at..at + n].to_vec();
            let to = rng.below(len + 1);
            out.splice(to..to, chunk);
        }
        // Truncate.
        6 if len > 0 => out.truncate(rng.below(len)),
        // Splice: a prefix of this input, a suffix of another.
        7 if !others.is_empty() => {
            let other = &others[rng.below(others.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            out.truncate(cut);
            out.extend_from_slice(&other[from..]);
        }
        // Insert a token of the grammar.
        8 | 9 if !tokens.is_empty() => {
            let token = tokens[rng.below(tokens.len())];
            let at = rng.below(len + 1);
            out.splice(at..at, token.iter().copied());
        }
        // Replace a range with a token.
        10 if !tokens.is_empty() && len > 0 => {
            let token = tokens[rng.below(tokens.len())];
            let at = rng.below(len);
            let n = rng.below((len - at).min(16) + 1);
            out.splice(at..at + n, token.iter().copied());
        }
        // The chosen mutation did not apply (empty input): grow instead.
        _ => out.push(rng.byte()),
    }
}

/// Grammar tokens per target, to make mutations reach past the first check.
pub fn tokens(target: &str) -> &'static [&'static [u8]] {
    match target {
        "agent_message" | "command_envelope" => &[
            // Protobuf: a huge length, a max varint, start/end group, tags of nested fields.
            b"\x12\xff\xff\xff\xff\x0f",
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
            b"\x0b",
            b"\x0c",
            b"\x1a\x00",
            b"\x0a\x02\xc3\x28",
            b"\x19\x00\x00\x00\x00\x00\x00\xf8\x7f",
            b"\x19\x00\x00\x00\x00\x00\x00\xf0\xff",
            // Postcard: zigzag extremes, long strings, enum tags.
            b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01",
            b"\x80\x80\x80\x80\x10",
            b"\x08",
            b"\x09",
        ],
        "rules_file" => &[
            b"groups:\n",
            b"- name: g\n  rules:\n",
            b"  - alert: A\n",
            b"    expr: ",
            b"    for: 5m\n",
            b"    keep_firing_for: 1h\n",
            b"    labels:\n      severity: ",
            b"    annotations:\n      summary: ",
            b"{{ $value }}",
            b"{{ $labels.node }}",
            b"{{ $value | humanize }}",
            b"{{ $value | humanizeDuration }}",
            b"{{ $value | humanizePercentage }}",
            b"{{ printf \"%.2f\" $value }}",
            b"{{ printf \"%*d\" $value }}",
            b"rate(flotilla_inference_requests_total[5m])",
            b"histogram_quantile(0.95, sum by (le) (rate(flotilla_inference_time_to_first_token_seconds_bucket[5m])))",
            b"avg_over_time(flotilla_gpu_temperature_celsius[10m])",
            b"sum by (node) (",
            b") > 0",
            b" offset 1y",
            b"[99999999999d]",
            b"1e308",
            b"NaN",
            b"Inf",
            b" and on(node) ",
            b" / ignoring(code) group_left ",
            b"absent(",
            b"&a ",
            b"*a",
            b"!!binary ",
            b"\n  ",
            b"'",
            b"\"",
        ],
        "deployment_spec" => &[
            b"name: llama-8b\n",
            b"model: { name: m, path: /srv/m }\n",
            b"runtime:\n  image: vllm/vllm-openai:v0.8.5\n  port: 8000\n  host_port: 18000\n  gpus: 1\n",
            b"placement: { nodes: [gpu-01, gpu-02], replicas: 2 }\n",
            b"placement: { selector: { pool: a100 }, replicas: 4 }\n",
            b"gateway: { node: gw-01, upstream: llama }\n",
            b"strategy: { type: canary, steps: [10, 50], bake: 1m }\n",
            b"strategy: { type: rolling, max_surge: 0, max_unavailable: 9 }\n",
            b"gpu_memory: 99999999999999GiB\n",
            b"shm_size: 1e30\n",
            b"replicas: 65\n",
            b"gpus: 4294967295\n",
            b"host_port: 65535\n",
            b"bake: 99999999999d\n",
            b"&a ",
            b"*a",
            b"<<: *a\n",
            b"!!binary ",
            b"\n  ",
            b"- ",
            b"~",
        ],
        "metrics_page" => &[
            b"# TYPE vllm:num_requests_running gauge\n",
            b"# TYPE vllm:e2e_request_latency_seconds histogram\n",
            b"vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 3\n",
            b"vllm:e2e_request_latency_seconds_sum{model_name=\"m\"} NaN\n",
            b"# HELP x y\n",
            b" counter\n",
            b" summary\n",
            b"{quantile=\"0.5\"}",
            b"sglang:",
            b"tgi_",
            b"llamacpp:",
            b"_total",
            b"_bucket",
            b"_count",
            b"{le=\"",
            b"\",",
            b"=\"",
            b"\\\"",
            b"\\n",
            b" -Inf",
            b" +Inf",
            b" 1e308",
            b" -1",
            b" 1700000000000",
            b"\n",
        ],
        "promql_selector" => &[
            b"flotilla_gpu_temperature_celsius",
            b"{node=\"gpu-01\"}",
            b",gpu!=\"1\"",
            b",uuid=~\"GPU-.*\"",
            b"=~\"(a|b)+\"",
            b"!~\"\"",
            b"__name__",
            b"sum(",
            b")",
            b"[5m]",
            b" offset 5m",
            b" @ 100",
            b" or ",
            b"\\",
            b"\n",
            b"`",
        ],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_is_fixed() {
        let mut rng = Rng::new(1);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        let mut again = Rng::new(1);
        assert_eq!(first, (0..3).map(|_| again.next_u64()).collect::<Vec<_>>());
        // SplitMix64's published output for seed 1.
        assert_eq!(first[0], 0x910a_2dec_8902_5cc1);
    }

    #[test]
    fn mutations_stay_within_the_length_bound() {
        let mut rng = Rng::new(7);
        let others = vec![vec![1u8; 100], b"groups: []".to_vec()];
        for _ in 0..10_000 {
            let out = mutate(&mut rng, b"groups:\n- name: g\n", &others, tokens("rules_file"), 64);
            assert!(out.len() <= 64);
        }
    }
}
