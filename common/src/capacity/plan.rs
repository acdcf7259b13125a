//! The seed's capacity worksheet: from a team's size and usage tier to the peak
//! tokens per second the fleet must serve, with headroom.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::{CapacityError, positive, within};

/// Share of a day's requests that falls in the peak hour, as the seed assumes.
pub const DEFAULT_PEAK_SHARE: f64 = 0.1;
/// Headroom above the peak; the seed asks for 30-50 %, and we take the middle.
pub const DEFAULT_HEADROOM: f64 = 0.4;
/// The seed's recommended headroom band, for people comparing against it.
pub const SEED_HEADROOM_BAND: (f64, f64) = (0.3, 0.5);

/// The seed's usage tiers ("Usage Estimates" in its capacity worksheet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Usage {
    /// 20-50 requests per user per day, 2,000 tokens each.
    Light,
    /// 50-150 requests per user per day, 3,000 tokens each.
    Medium,
    /// 150-300 requests per user per day, 4,000 tokens each.
    Heavy,
}

impl Usage {
    /// The seed's range of requests per user per day.
    pub fn requests_range(self) -> (f64, f64) {
        match self {
            Usage::Light => (20.0, 50.0),
            Usage::Medium => (50.0, 150.0),
            Usage::Heavy => (150.0, 300.0),
        }
    }

    /// The midpoint of the range: the seed's own example uses 100 for medium.
    pub fn requests_per_user_per_day(self) -> f64 {
        let (lo, hi) = self.requests_range();
        (lo + hi) / 2.0
    }

    /// The seed's tokens per request (prompt and response together).
    pub fn tokens_per_request(self) -> f64 {
        match self {
            Usage::Light => 2_000.0,
            Usage::Medium => 3_000.0,
            Usage::Heavy => 4_000.0,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Usage::Light => "light",
            Usage::Medium => "medium",
            Usage::Heavy => "heavy",
        }
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Usage {
    type Err = CapacityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "light" => Ok(Usage::Light),
            "medium" => Ok(Usage::Medium),
            "heavy" => Ok(Usage::Heavy),
            _ => Err(CapacityError::Unknown { what: "usage", got: s.to_owned(), expected: "light, medium, heavy" }),
        }
    }
}

/// What the worksheet asks for; `None` takes the usage tier's figure.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanInput {
    pub team: u32,
    pub usage: Usage,
    pub requests_per_user: Option<f64>,
    pub tokens_per_request: Option<f64>,
    /// Share of daily requests in the peak hour, in (0, 1].
    pub peak_share: f64,
    /// Headroom above the peak, in [0, 10] (0.4 = 40 %).
    pub headroom: f64,
}

impl PlanInput {
    /// A team of `team` at `usage`, with the seed's defaults for the rest.
    pub fn new(team: u32, usage: Usage) -> Self {
        Self {
            team,
            usage,
            requests_per_user: None,
            tokens_per_request: None,
            peak_share: DEFAULT_PEAK_SHARE,
            headroom: DEFAULT_HEADROOM,
        }
    }
}

/// The worksheet filled in: the inputs as used, and what they come to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub team: u32,
    pub usage: Usage,
    pub requests_per_user_per_day: f64,
    pub tokens_per_request: f64,
    pub peak_share: f64,
    pub headroom: f64,
    pub daily_requests: f64,
    pub peak_requests_per_minute: f64,
    pub required_tokens_per_second: f64,
    pub required_with_headroom_tokens_per_second: f64,
}

/// Fills in the worksheet:
///
/// - daily requests = team × requests per user per day
/// - peak requests per minute = daily requests × peak share / 60 (the peak hour's requests, per minute)
/// - required tokens per second = peak requests per minute × tokens per request / 60
/// - with headroom = required × (1 + headroom)
pub fn plan(input: &PlanInput) -> Result<Plan, CapacityError> {
    if input.team == 0 {
        return Err(CapacityError::OutOfRange { name: "team", expected: "at least 1", got: "0".to_owned() });
    }
    let requests =
        positive("requests_per_user", input.requests_per_user.unwrap_or(input.usage.requests_per_user_per_day()))?;
    let tokens = positive("tokens_per_request", input.tokens_per_request.unwrap_or(input.usage.tokens_per_request()))?;
    let peak_share = within("peak_share", input.peak_share, 0.0, 1.0, true, "in (0, 1]")?;
    let headroom = within("headroom", input.headroom, 0.0, 10.0, false, "in [0, 10] (0.4 = 40 %)")?;
    let daily_requests = f64::from(input.team) * requests;
    let peak_requests_per_minute = daily_requests * peak_share / 60.0;
    let required = peak_requests_per_minute * tokens / 60.0;
    let with_headroom = required * (1.0 + headroom);
    // Each input is finite, but their product need not be (1e300 requests a user).
    if !with_headroom.is_finite() {
        return Err(CapacityError::Overflow { what: "the required tokens per second" });
    }
    Ok(Plan {
        team: input.team,
        usage: input.usage,
        requests_per_user_per_day: requests,
        tokens_per_request: tokens,
        peak_share,
        headroom,
        daily_requests,
        peak_requests_per_minute,
        required_tokens_per_second: required,
        required_with_headroom_tokens_per_second: with_headroom,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    #[test]
    fn the_seeds_worked_example() {
        // 50 medium-usage developers: the seed's own example.
        let p = plan(&PlanInput::new(50, Usage::Medium)).unwrap();
        assert_eq!(p.requests_per_user_per_day, 100.0);
        assert_eq!(p.tokens_per_request, 3_000.0);
        assert_eq!(p.daily_requests, 5_000.0);
        assert!(close(p.peak_requests_per_minute, 8.3, 0.005), "{}", p.peak_requests_per_minute);
        // The seed rounds 8.33 requests/min to 8.3 before multiplying, which gives 415;
        // exact arithmetic gives 416.7 tokens/s, 0.4 % above it.
        assert!(close(p.required_tokens_per_second, 415.0, 0.005), "{}", p.required_tokens_per_second);
        assert!((p.required_tokens_per_second - 416.666_666).abs() < 0.001);
        // The seed's 30-50 % headroom band around the default of 40 %.
        let at = |headroom: f64| plan(&PlanInput { headroom, ..PlanInput::new(50, Usage::Medium) }).unwrap();
        assert!((at(SEED_HEADROOM_BAND.0).required_with_headroom_tokens_per_second - 541.666_666).abs() < 0.001);
        assert!((p.required_with_headroom_tokens_per_second - 583.333_333).abs() < 0.001);
        assert!((at(SEED_HEADROOM_BAND.1).required_with_headroom_tokens_per_second - 625.0).abs() < 0.001);
    }

    #[test]
    fn tiers_take_the_midpoints_and_overrides_win() {
        assert_eq!(Usage::Light.requests_per_user_per_day(), 35.0);
        assert_eq!(Usage::Medium.requests_per_user_per_day(), 100.0);
        assert_eq!(Usage::Heavy.requests_per_user_per_day(), 225.0);
        assert_eq!("Heavy".parse::<Usage>(), Ok(Usage::Heavy));
        assert!("extreme".parse::<Usage>().unwrap_err().to_string().contains("light, medium, heavy"));
        let p = plan(&PlanInput {
            requests_per_user: Some(10.0),
            tokens_per_request: Some(600.0),
            peak_share: 1.0,
            headroom: 0.0,
            ..PlanInput::new(6, Usage::Heavy)
        })
        .unwrap();
        assert_eq!(p.daily_requests, 60.0);
        assert_eq!(p.peak_requests_per_minute, 1.0);
        assert_eq!(p.required_tokens_per_second, 10.0);
        assert_eq!(p.required_with_headroom_tokens_per_second, 10.0);
    }

    #[test]
    fn bad_inputs_are_refused_by_name() {
        let base = PlanInput::new(50, Usage::Medium);
        let err = |input: PlanInput| plan(&input).unwrap_err().to_string();
        assert!(err(PlanInput { team: 0, ..base.clone() }).starts_with("team must be at least 1"));
        for bad in [-1.0, 0.0, f64::NAN, f64::INFINITY] {
            assert!(err(PlanInput { requests_per_user: Some(bad), ..base.clone() }).starts_with("requests_per_user"));
            assert!(err(PlanInput { tokens_per_request: Some(bad), ..base.clone() }).starts_with("tokens_per_request"));
        }
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            assert!(err(PlanInput { peak_share: bad, ..base.clone() }).starts_with("peak_share must be in (0, 1]"));
        }
        for bad in [-0.01, 10.5, f64::NAN, f64::NEG_INFINITY] {
            assert!(err(PlanInput { headroom: bad, ..base.clone() }).starts_with("headroom must be in [0, 10]"));
        }
        let huge = PlanInput { requests_per_user: Some(1e300), tokens_per_request: Some(1e300), ..base };
        assert!(err(huge).contains("overflows"));
    }
}
