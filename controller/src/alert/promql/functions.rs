//! The arithmetic of PromQL's functions over sample values, written to give
//! bit-for-bit the results of Prometheus 2.x (`promql/functions.go` and
//! `promql/quantile.go`): the same operations in the same order.

use std::cmp::Ordering;

/// One sample of a range: (Unix ms, value).
pub(super) type Point = (i64, f64);

/// `rate`, `increase` and `delta`: the change over the range, extrapolated to
/// the range's boundaries (Prometheus' `extrapolatedRate`). `None` below two samples.
pub(super) fn extrapolated_rate(
    points: &[Point],
    range_start: i64,
    range_end: i64,
    range_secs: f64,
    is_counter: bool,
    is_rate: bool,
) -> Option<f64> {
    let (&(first_t, first_v), &(last_t, last_v)) = (points.first()?, points.last()?);
    if points.len() < 2 {
        return None;
    }
    let mut result = last_v - first_v;
    if is_counter {
        // A drop is a counter reset: the counter restarted from zero, so the
        // value before the drop was gained as well.
        let mut prev = first_v;
        for &(_, v) in &points[1..] {
            if v < prev {
                result += prev;
            }
            prev = v;
        }
    }
    let mut duration_to_start = (first_t - range_start) as f64 / 1000.0;
    let duration_to_end = (range_end - last_t) as f64 / 1000.0;
    let sampled_interval = (last_t - first_t) as f64 / 1000.0;
    let average_between_samples = sampled_interval / (points.len() - 1) as f64;
    if is_counter && result > 0.0 && first_v >= 0.0 {
        // A counter cannot go below zero: extrapolate no further back than
        // where the slope reaches zero.
        let duration_to_zero = sampled_interval * (first_v / result);
        if duration_to_zero < duration_to_start {
            duration_to_start = duration_to_zero;
        }
    }
    // Extrapolate to a boundary only when a sample there was about due;
    // otherwise assume the series started or ended half an interval away.
    let threshold = average_between_samples * 1.1;
    let mut extrapolate_to = sampled_interval;
    extrapolate_to += if duration_to_start < threshold { duration_to_start } else { average_between_samples / 2.0 };
    extrapolate_to += if duration_to_end < threshold { duration_to_end } else { average_between_samples / 2.0 };
    let mut factor = extrapolate_to / sampled_interval;
    if is_rate {
        factor /= range_secs;
    }
    Some(result * factor)
}

/// `irate` and `idelta`: the change between the last two samples
/// (Prometheus' `instantValue`). `None` below two samples.
pub(super) fn instant_value(points: &[Point], is_rate: bool) -> Option<f64> {
    let [.., (prev_t, prev_v), (last_t, last_v)] = points else {
        return None;
    };
    let mut result = if is_rate && last_v < prev_v { *last_v } else { last_v - prev_v };
    let interval = last_t - prev_t;
    if interval == 0 {
        return None;
    }
    if is_rate {
        result /= interval as f64 / 1000.0;
    }
    Some(result)
}

/// One step of Kahan-Neumaier summation: `(sum + inc, compensation)`.
fn kahan_inc(inc: f64, sum: f64, c: f64) -> (f64, f64) {
    let t = sum + inc;
    let c = if sum.abs() >= inc.abs() { c + ((sum - t) + inc) } else { c + ((inc - t) + sum) };
    (t, c)
}

pub(super) fn sum_over_time(points: &[Point]) -> f64 {
    let (mut sum, mut c) = (0.0, 0.0);
    for &(_, v) in points {
        (sum, c) = kahan_inc(v, sum, c);
    }
    if sum.is_infinite() { sum } else { sum + c }
}

pub(super) fn avg_over_time(points: &[Point]) -> f64 {
    let (mut mean, mut count, mut c) = (0.0f64, 0.0, 0.0);
    for &(_, v) in points {
        count += 1.0;
        if mean.is_infinite() {
            // An infinite mean stays what it is unless a NaN or an infinity of
            // the other sign arrives; the update below would make it NaN.
            if v.is_infinite() && (mean > 0.0) == (v > 0.0) {
                continue;
            }
            if !v.is_infinite() && !v.is_nan() {
                continue;
            }
        }
        (mean, c) = kahan_inc(v / count - mean / count, mean, c);
    }
    if mean.is_infinite() { mean } else { mean + c }
}

pub(super) fn stddev_over_time(points: &[Point]) -> f64 {
    let (mut count, mut mean, mut c_mean, mut aux, mut c_aux) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(_, v) in points {
        count += 1.0;
        let delta = v - (mean + c_mean);
        (mean, c_mean) = kahan_inc(delta / count, mean, c_mean);
        (aux, c_aux) = kahan_inc(delta * (v - (mean + c_mean)), aux, c_aux);
    }
    ((aux + c_aux) / count).sqrt()
}

pub(super) fn min_over_time(points: &[Point]) -> f64 {
    let mut min = points.first().map_or(f64::NAN, |p| p.1);
    for &(_, v) in points {
        if v < min || min.is_nan() {
            min = v;
        }
    }
    min
}

pub(super) fn max_over_time(points: &[Point]) -> f64 {
    let mut max = points.first().map_or(f64::NAN, |p| p.1);
    for &(_, v) in points {
        if v > max || max.is_nan() {
            max = v;
        }
    }
    max
}

/// The φ-quantile of `values` by linear interpolation between the closest
/// ranks (Prometheus' `quantile`, used by `quantile_over_time`).
pub(super) fn quantile(q: f64, values: &mut [f64]) -> f64 {
    if values.is_empty() || q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    // NaN sorts first, as Go's `vectorByValueHeap` orders it.
    values.sort_by(|a, b| match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => a.partial_cmp(b).unwrap_or(Ordering::Equal),
    });
    let n = values.len() as f64;
    let rank = q * (n - 1.0);
    let lower = rank.floor().max(0.0);
    let upper = (lower + 1.0).min(n - 1.0);
    let weight = rank - rank.floor();
    let at = |i: f64| values.get(i as usize).copied().unwrap_or(f64::NAN);
    at(lower) * (1.0 - weight) + at(upper) * weight
}

/// One classic histogram bucket: upper bound and cumulative count.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bucket {
    pub(super) upper: f64,
    pub(super) count: f64,
}

/// The φ-quantile of a classic histogram (Prometheus' `bucketQuantile`):
/// linear interpolation inside the bucket the rank falls in; NaN without a
/// `+Inf` bucket or observations; counts forced monotonic first.
pub(super) fn bucket_quantile(q: f64, buckets: &mut Vec<Bucket>) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    buckets.sort_by(|a, b| a.upper.partial_cmp(&b.upper).unwrap_or(Ordering::Equal));
    if !buckets.last().is_some_and(|b| b.upper == f64::INFINITY) {
        return f64::NAN;
    }
    coalesce(buckets);
    ensure_monotonic(buckets);
    let n = buckets.len();
    if n < 2 {
        return f64::NAN;
    }
    let observations = buckets[n - 1].count;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    // The first bucket (of all but the +Inf one) whose count reaches the rank.
    let b = go_search(n - 1, |i| buckets[i].count >= rank);
    if b == n - 1 {
        return buckets[n - 2].upper;
    }
    if b == 0 && buckets[0].upper <= 0.0 {
        return buckets[0].upper;
    }
    let bucket_end = buckets[b].upper;
    let mut count = buckets[b].count;
    let mut bucket_start = 0.0;
    if b > 0 {
        bucket_start = buckets[b - 1].upper;
        count -= buckets[b - 1].count;
        rank -= buckets[b - 1].count;
    }
    bucket_start + (bucket_end - bucket_start) * (rank / count)
}

/// Go's `sort.Search`: the smallest `i < n` for which `f(i)` holds, or `n`,
/// probing in Go's order (which matters when `f` is not monotonic, e.g. NaN).
fn go_search(n: usize, f: impl Fn(usize) -> bool) -> usize {
    let (mut i, mut j) = (0, n);
    while i < j {
        let h = i + (j - i) / 2;
        if f(h) {
            j = h;
        } else {
            i = h + 1;
        }
    }
    i
}

/// Merges buckets with the same upper bound (`le="1"` and `le="1.0"`), summing counts.
fn coalesce(buckets: &mut Vec<Bucket>) {
    let mut out: Vec<Bucket> = Vec::with_capacity(buckets.len());
    for &b in buckets.iter() {
        match out.last_mut() {
            Some(last) if last.upper == b.upper => last.count += b.count,
            _ => out.push(b),
        }
    }
    *buckets = out;
}

/// Raises any count below an earlier one to that count: cumulative counts
/// cannot fall, and scrapes of different buckets at slightly different times
/// can make them appear to.
fn ensure_monotonic(buckets: &mut [Bucket]) {
    let mut max = f64::NEG_INFINITY;
    for b in buckets {
        if b.count > max {
            max = b.count;
        } else if b.count < max {
            b.count = max;
        }
    }
}

/// Go's `math.Pow`, step for step: the special cases, then the integer part of
/// the exponent by repeated squaring of the mantissa (which rounds differently
/// from a correctly rounded `powf`), times `exp(frac × ln x)` for a fractional
/// part. Integer and ±0.5 exponents give Go's bits exactly; other fractional
/// exponents use Rust's `exp`/`ln`, which may differ from Go's in the last bit.
pub(super) fn go_pow(x: f64, y: f64) -> f64 {
    if y == 0.0 || x == 1.0 {
        return 1.0;
    }
    if y == 1.0 {
        return x;
    }
    if x.is_nan() || y.is_nan() {
        return f64::NAN;
    }
    if x == 0.0 {
        let odd = x.is_sign_negative() && is_odd_int(y);
        return if y < 0.0 {
            if odd { f64::NEG_INFINITY } else { f64::INFINITY }
        } else if odd {
            x
        } else {
            0.0
        };
    }
    if y.is_infinite() {
        return if x == -1.0 {
            1.0
        } else if (x.abs() < 1.0) == (y > 0.0) {
            0.0
        } else {
            f64::INFINITY
        };
    }
    if x.is_infinite() {
        if x < 0.0 {
            return go_pow(1.0 / x, -y);
        }
        return if y < 0.0 { 0.0 } else { f64::INFINITY };
    }
    if y == 0.5 {
        return x.sqrt();
    }
    if y == -0.5 {
        return 1.0 / x.sqrt();
    }
    let (mut yi, mut yf) = (y.abs().trunc(), y.abs().fract());
    if yf != 0.0 && x < 0.0 {
        return f64::NAN;
    }
    if yi >= (1u64 << 63) as f64 {
        // A huge even integer: overflow or underflow for all x but -1.
        return if x == -1.0 {
            1.0
        } else if (x.abs() < 1.0) == (y > 0.0) {
            0.0
        } else {
            f64::INFINITY
        };
    }
    // The answer is a1 × 2^ae.
    let mut a1 = 1.0;
    let mut ae: i64 = 0;
    if yf != 0.0 {
        if yf > 0.5 {
            yf -= 1.0;
            yi += 1.0;
        }
        a1 = (yf * x.ln()).exp();
    }
    let (mut x1, mut xe) = frexp(x);
    let mut i = yi as i64;
    while i != 0 {
        if !(-(1 << 12)..=(1 << 12)).contains(&xe) {
            // Catastrophic overflow: let ldexp deal with it.
            ae += xe;
            break;
        }
        if i & 1 == 1 {
            a1 *= x1;
            ae += xe;
        }
        x1 *= x1;
        xe <<= 1;
        if x1 < 0.5 {
            x1 += x1;
            xe -= 1;
        }
        i >>= 1;
    }
    if y < 0.0 {
        a1 = 1.0 / a1;
        ae = -ae;
    }
    ldexp(a1, ae)
}

/// Go's `isOddInt`.
fn is_odd_int(x: f64) -> bool {
    if x.abs() >= (1u64 << 53) as f64 {
        return false;
    }
    x.fract() == 0.0 && (x.trunc() as i64) & 1 == 1
}

const SMALLEST_NORMAL: f64 = 2.2250738585072014e-308;

/// Go's `math.Frexp`: `x = frac × 2^exp` with `|frac|` in [0.5, 1).
fn frexp(x: f64) -> (f64, i64) {
    if x == 0.0 || x.is_infinite() || x.is_nan() {
        return (x, 0);
    }
    let (x, mut exp) = if x.abs() < SMALLEST_NORMAL { (x * (1u64 << 52) as f64, -52) } else { (x, 0) };
    let bits = x.to_bits();
    exp += ((bits >> 52) & 0x7ff) as i64 - 1022;
    let bits = (bits & !(0x7ff << 52)) | (1022 << 52);
    (f64::from_bits(bits), exp)
}

/// Go's `math.Ldexp`: `frac × 2^exp`, with Go's handling of overflow,
/// underflow and subnormals.
fn ldexp(frac: f64, exp: i64) -> f64 {
    if frac == 0.0 || frac.is_infinite() || frac.is_nan() {
        return frac;
    }
    let (frac, e) = if frac.abs() < SMALLEST_NORMAL { (frac * (1u64 << 52) as f64, -52) } else { (frac, 0) };
    let mut exp = exp.saturating_add(e);
    let bits = frac.to_bits();
    exp = exp.saturating_add(((bits >> 52) & 0x7ff) as i64 - 1023);
    if exp < -1075 {
        return 0.0f64.copysign(frac);
    }
    if exp > 1023 {
        return if frac < 0.0 { f64::NEG_INFINITY } else { f64::INFINITY };
    }
    let mut m = 1.0;
    if exp < -1022 {
        exp += 53;
        m = 1.0 / (1u64 << 53) as f64;
    }
    let bits = (bits & !(0x7ff << 52)) | (((exp + 1023) as u64) << 52);
    m * f64::from_bits(bits)
}

/// Go's `math.Max`: NaN wins, and +0 beats -0.
pub(super) fn go_max(x: f64, y: f64) -> f64 {
    if (x.is_infinite() && x > 0.0) || (y.is_infinite() && y > 0.0) {
        return f64::INFINITY;
    }
    if x.is_nan() || y.is_nan() {
        return f64::NAN;
    }
    if x == 0.0 && x == y {
        return if x.is_sign_negative() { y } else { x };
    }
    if x > y { x } else { y }
}

/// Go's `math.Min`: NaN wins, and -0 beats +0.
pub(super) fn go_min(x: f64, y: f64) -> f64 {
    if (x.is_infinite() && x < 0.0) || (y.is_infinite() && y < 0.0) {
        return f64::NEG_INFINITY;
    }
    if x.is_nan() || y.is_nan() {
        return f64::NAN;
    }
    if x == 0.0 && x == y {
        return if x.is_sign_negative() { x } else { y };
    }
    if x < y { x } else { y }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(values: &[(i64, f64)]) -> Vec<Point> {
        values.to_vec()
    }

    #[test]
    fn rate_handles_resets_and_extrapolates_like_prometheus() {
        // Samples every 15 s; a reset from 12 to 2.
        let p = pts(&[(30_000, 12.0), (45_000, 2.0), (60_000, 9.0), (75_000, 15.0), (90_000, 22.0)]);
        // Range [30 s, 90 s]: both ends sampled, no extrapolation: (22 - 12 + 12) / 60.
        assert_eq!(extrapolated_rate(&p, 30_000, 90_000, 60.0, true, true), Some(22.0 / 60.0));
        // As a gauge the drop is not a reset.
        assert_eq!(extrapolated_rate(&p, 30_000, 90_000, 60.0, false, false), Some(10.0));
        // Counter 3..22 with a reset, range (-10 s, 90 s]: extrapolation back
        // stops where the counter would reach zero, giving 31 + 3.
        let p = pts(&[
            (0, 3.0),
            (15_000, 7.0),
            (30_000, 12.0),
            (45_000, 2.0),
            (60_000, 9.0),
            (75_000, 15.0),
            (90_000, 22.0),
        ]);
        assert_eq!(extrapolated_rate(&p, -10_000, 90_000, 100.0, true, false), Some(34.0));
        assert_eq!(extrapolated_rate(&p[..1], 0, 90_000, 90.0, true, true), None);
        // Far from both ends: half an interval is added at each end.
        let p = pts(&[(100_000, 1.0), (110_000, 2.0)]);
        assert_eq!(extrapolated_rate(&p, 0, 300_000, 300.0, false, false), Some(2.0));
    }

    #[test]
    fn irate_uses_the_last_two_samples() {
        let p = pts(&[(0, 5.0), (10_000, 8.0), (15_000, 2.0)]);
        assert_eq!(instant_value(&p, true), Some(2.0 / 5.0), "a reset counts from zero");
        assert_eq!(instant_value(&p, false), Some(-6.0));
        assert_eq!(instant_value(&p[..1], true), None);
    }

    #[test]
    fn over_time_aggregates() {
        let p = pts(&[(0, 1e16), (1, 1.0), (2, -1e16), (3, 0.5)]);
        assert_eq!(sum_over_time(&p), 1.5, "Kahan summation keeps the small terms");
        assert_eq!(sum_over_time(&pts(&[(0, 1.0), (1, f64::INFINITY)])), f64::INFINITY);
        assert_eq!(avg_over_time(&pts(&[(0, 1.0), (1, 2.0), (2, 6.0)])), 3.0);
        assert_eq!(avg_over_time(&pts(&[(0, f64::INFINITY), (1, 2.0)])), f64::INFINITY);
        assert!(avg_over_time(&pts(&[(0, f64::INFINITY), (1, f64::NEG_INFINITY)])).is_nan());
        assert_eq!(stddev_over_time(&pts(&[(0, 2.0), (1, 4.0), (2, 4.0), (3, 4.0), (4, 5.0)])), 0.9797958971132712);
        assert_eq!(min_over_time(&pts(&[(0, f64::NAN), (1, 3.0), (2, 1.0)])), 1.0, "a NaN first is replaced");
        assert_eq!(max_over_time(&pts(&[(0, 1.0), (1, f64::NAN), (2, 0.5)])), 1.0, "a NaN later is skipped");
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(0.5, &mut [3.0, 1.0, 2.0, 4.0]), 2.5);
        assert_eq!(quantile(0.0, &mut [3.0, 1.0]), 1.0);
        assert_eq!(quantile(1.0, &mut [3.0, 1.0]), 3.0);
        assert_eq!(quantile(1.5, &mut [3.0]), f64::INFINITY);
        assert_eq!(quantile(-1.0, &mut [3.0]), f64::NEG_INFINITY);
        assert!(quantile(f64::NAN, &mut [3.0]).is_nan());
    }

    fn b(pairs: &[(f64, f64)]) -> Vec<Bucket> {
        pairs.iter().map(|&(upper, count)| Bucket { upper, count }).collect()
    }

    #[test]
    fn bucket_quantile_interpolates_like_prometheus() {
        let inf = f64::INFINITY;
        let h = b(&[(0.1, 10.0), (0.5, 60.0), (1.0, 90.0), (inf, 100.0)]);
        // Rank 50 falls in (0.1, 0.5]: 0.1 + 0.4 * 40/50.
        assert_eq!(bucket_quantile(0.5, &mut h.clone()), 0.1 + 0.4 * (40.0 / 50.0));
        // Rank 95 is past the last finite bucket: its upper bound.
        assert_eq!(bucket_quantile(0.95, &mut h.clone()), 1.0);
        // Rank 5 in the first bucket interpolates from zero.
        assert_eq!(bucket_quantile(0.05, &mut h.clone()), 0.05);
        assert!(bucket_quantile(0.5, &mut b(&[(0.1, 1.0), (1.0, 2.0)])).is_nan(), "no +Inf bucket");
        assert!(bucket_quantile(0.5, &mut b(&[(inf, 2.0)])).is_nan(), "only +Inf");
        assert!(bucket_quantile(0.5, &mut b(&[(1.0, 0.0), (inf, 0.0)])).is_nan(), "no observations");
        assert_eq!(bucket_quantile(2.0, &mut h.clone()), inf);
        assert_eq!(bucket_quantile(-2.0, &mut h.clone()), f64::NEG_INFINITY);
        // Out of order and non-monotonic: sorted, then 5 is raised to 8.
        let mut m = b(&[(inf, 10.0), (2.0, 5.0), (1.0, 8.0)]);
        assert_eq!(bucket_quantile(0.5, &mut m), 0.625);
        // Equal bounds are merged.
        let mut d = b(&[(1.0, 2.0), (1.0, 2.0), (inf, 4.0)]);
        assert_eq!(bucket_quantile(0.5, &mut d), 0.5);
        // A first bucket at or below zero is returned as is.
        assert_eq!(bucket_quantile(0.1, &mut b(&[(-1.0, 5.0), (inf, 10.0)])), -1.0);
    }

    #[test]
    fn go_pow_matches_go() {
        // Repeated squaring rounds differently from a correctly rounded pow;
        // these are Go's results.
        assert_eq!(go_pow(2.0, 10.0), 1024.0);
        assert_eq!(go_pow(2.0, -2.0), 0.25);
        assert_eq!(go_pow(9.0, 0.5), 3.0);
        assert!(go_pow(-8.0, 1.0 / 3.0).is_nan());
        assert_eq!(go_pow(f64::NAN, 0.0), 1.0);
        assert_eq!(go_pow(1.0, f64::NAN), 1.0);
        assert_eq!(go_pow(-0.0, -3.0), f64::NEG_INFINITY);
        assert_eq!(go_pow(0.0, -2.0), f64::INFINITY);
        assert_eq!(go_pow(-1.0, f64::INFINITY), 1.0);
        assert_eq!(go_pow(0.5, f64::INFINITY), 0.0);
        assert_eq!(go_pow(f64::NEG_INFINITY, 3.0), f64::NEG_INFINITY);
        assert_eq!(go_pow(f64::NEG_INFINITY, -3.0), -0.0);
        assert_eq!(go_pow(10.0, 400.0), f64::INFINITY);
        assert_eq!(go_pow(10.0, -400.0), 0.0);
        assert_eq!(go_pow(2.0, -1074.0), 5e-324);
        for x in [0.1, 1.1, 3.7, 1e-3, 123.456] {
            for y in [2.0, 3.0, 7.0, -3.0] {
                let (f, e) = frexp(x);
                assert_eq!(ldexp(f, e), x);
                assert!((go_pow(x, y) / x.powf(y) - 1.0).abs() < 1e-14, "{x}^{y}");
            }
        }
    }

    #[test]
    fn go_min_max() {
        assert!(go_max(f64::NAN, 1.0).is_nan());
        assert!(go_min(1.0, f64::NAN).is_nan());
        assert_eq!(go_max(f64::NAN, f64::INFINITY), f64::INFINITY);
        assert!(go_max(-0.0, 0.0).is_sign_positive());
        assert!(go_min(0.0, -0.0).is_sign_negative());
        assert_eq!(go_max(1.0, 2.0), 2.0);
        assert_eq!(go_min(1.0, 2.0), 1.0);
    }
}
