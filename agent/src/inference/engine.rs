//! The inference engines the collector understands, and how a page says which one
//! it came from.

use serde::{Deserialize, Serialize};

/// An inference server whose `/metrics` page the collector can normalise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// vLLM (V0 and V1 engines): metric names start with `vllm:`.
    Vllm,
    /// SGLang: metric names start with `sglang:`.
    Sglang,
    /// Hugging Face text-generation-inference: metric names start with `tgi_`.
    Tgi,
    /// llama.cpp `llama-server`: metric names start with `llamacpp:`.
    #[serde(rename = "llamacpp")]
    LlamaCpp,
}

impl Engine {
    /// Every engine, in the order detection breaks ties.
    pub const ALL: [Engine; 4] = [Engine::Vllm, Engine::Sglang, Engine::Tgi, Engine::LlamaCpp];

    /// The lowercase name used in config, in the mapping table and as the `engine` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vllm => "vllm",
            Self::Sglang => "sglang",
            Self::Tgi => "tgi",
            Self::LlamaCpp => "llamacpp",
        }
    }
}

impl std::str::FromStr for Engine {
    type Err = String;

    /// Reads [`Engine::as_str`] back (a container label carries the engine this way).
    fn from_str(s: &str) -> Result<Self, String> {
        Engine::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not an inference engine (vllm, sglang, tgi or llamacpp)"))
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Picks the engine with the most sample names carrying its prefix, or `None` when
/// no sample has any engine's prefix (a dcgm-exporter page, an empty page).
///
/// Counting instead of taking the first match matters for proxies and sidecars that
/// re-export a few foreign series next to their own.
pub(crate) fn detect<'a>(
    names: impl IntoIterator<Item = &'a str>,
    prefix: impl Fn(Engine) -> &'a str,
) -> Option<Engine> {
    let prefixes = Engine::ALL.map(|e| (e, prefix(e)));
    let mut counts = [0usize; Engine::ALL.len()];
    for name in names {
        for (slot, (_, p)) in counts.iter_mut().zip(prefixes.iter()) {
            if name.starts_with(p) {
                *slot += 1;
            }
        }
    }
    let (best, count) = counts.iter().enumerate().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))?;
    (*count > 0).then(|| Engine::ALL[best])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(e: Engine) -> &'static str {
        match e {
            Engine::Vllm => "vllm:",
            Engine::Sglang => "sglang:",
            Engine::Tgi => "tgi_",
            Engine::LlamaCpp => "llamacpp:",
        }
    }

    #[test]
    fn the_most_common_prefix_wins() {
        let names = ["process_cpu_seconds_total", "tgi_queue_size", "vllm:a", "vllm:b"];
        assert_eq!(detect(names, prefix), Some(Engine::Vllm));
        assert_eq!(detect(["DCGM_FI_DEV_GPU_TEMP"], prefix), None);
        assert_eq!(detect([], prefix), None);
    }

    #[test]
    fn ties_go_to_the_first_engine_listed() {
        assert_eq!(detect(["sglang:a", "vllm:a"], prefix), Some(Engine::Vllm));
    }

    #[test]
    fn config_names_are_lowercase() {
        #[derive(Deserialize)]
        struct W {
            e: Engine,
        }
        let w: W = toml::from_str("e = \"llamacpp\"").unwrap();
        assert_eq!(w.e, Engine::LlamaCpp);
        assert!(toml::from_str::<W>("e = \"LlamaCpp\"").is_err());
        for e in Engine::ALL {
            let w: W = toml::from_str(&format!("e = \"{e}\"")).unwrap();
            assert_eq!(w.e, e);
        }
    }
}
