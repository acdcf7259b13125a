//! A PromQL instant selector as `Fleet.QueryMetrics` reads it, and silence
//! matchers as `Fleet.CreateSilence` reads them (one matcher a line here);
//! what parses is matched against a few series.

use flotilla_controller::alert::state::SilenceMatcher;
use flotilla_controller::selector::Selector;

pub fn run(data: &[u8]) {
    let text = super::text(data);
    let labels: Vec<(String, String)> = [("gpu", "0"), ("node", "gpu-01"), ("uuid", "GPU-0")]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    if let Ok(selector) = Selector::parse(&text) {
        let _ = selector.matches("flotilla_gpu_temperature_celsius", &labels);
        let _ = selector.matches("", &[]);
        let _ = selector.may_match_label("node", "gpu-01");
    }
    let matchers: Vec<String> = text.lines().map(str::to_owned).collect();
    if let Ok(silence) = SilenceMatcher::new(&matchers) {
        let _ = silence.matches(&labels);
    }
}
