//! A model's shape as the memory estimate needs it: parameter count, layers, KV heads
//! and head size, from explicit sizes or a Hugging Face `config.json`.

use serde::{Deserialize, Serialize};

use super::memory::Dtype;
use super::{CapacityError, positive};

/// Where the parameter count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamsSource {
    /// Given by the operator (`--params 8B`): a published count.
    Given,
    /// Estimated from the layer sizes in `config.json`, which carries no count.
    Estimated,
}

/// What the memory estimate needs to know about a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    /// Parameter count (not billions).
    pub params: f64,
    pub params_source: ParamsSource,
    /// The estimate from `config.json`, also when the count was given, to compare.
    pub estimated_params: Option<f64>,
    pub layers: u32,
    /// Query heads; unknown when sizes were given by hand without them.
    pub attention_heads: Option<u32>,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub hidden_size: Option<u32>,
    /// What the config says the checkpoint is stored as, when it says it plainly.
    pub config_dtype: Option<Dtype>,
    /// What the estimate could not model, for people.
    pub notes: Vec<String>,
}

/// The fields of a Hugging Face `config.json` that the estimate reads; the rest are ignored.
#[derive(Debug, Default, Deserialize)]
struct HfConfig {
    num_hidden_layers: Option<u64>,
    num_attention_heads: Option<u64>,
    num_key_value_heads: Option<u64>,
    hidden_size: Option<u64>,
    head_dim: Option<u64>,
    intermediate_size: Option<u64>,
    vocab_size: Option<u64>,
    tie_word_embeddings: Option<bool>,
    // Mixture of experts: Mixtral says num_local_experts, DeepSeek n_routed_experts, Qwen num_experts.
    num_local_experts: Option<u64>,
    n_routed_experts: Option<u64>,
    num_experts: Option<u64>,
    moe_intermediate_size: Option<u64>,
    n_shared_experts: Option<u64>,
    shared_expert_intermediate_size: Option<u64>,
    first_k_dense_replace: Option<u64>,
    // Multi-head latent attention (DeepSeek-V2/V3) caches a compressed KV, not heads.
    kv_lora_rank: Option<u64>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    quantization_config: Option<QuantizationConfig>,
}

#[derive(Debug, Default, Deserialize)]
struct QuantizationConfig {
    quant_method: Option<String>,
}

/// A positive count that fits a `u32`, or an error naming the field.
fn count(name: &str, v: u64) -> Result<u32, CapacityError> {
    match u32::try_from(v) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(CapacityError::ModelConfig(format!("{name} must be between 1 and {}, got {v}", u32::MAX))),
    }
}

fn required(name: &str, v: Option<u64>) -> Result<u32, CapacityError> {
    count(name, v.ok_or_else(|| CapacityError::ModelConfig(format!("{name} is missing")))?)
}

impl ModelShape {
    /// A shape from explicit sizes (`--params --layers --kv-heads --head-dim`).
    pub fn new(
        params: f64,
        layers: u32,
        kv_heads: u32,
        head_dim: u32,
        attention_heads: Option<u32>,
    ) -> Result<Self, CapacityError> {
        let params = positive("params", params)?;
        for (name, v) in [("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim)] {
            if v == 0 {
                return Err(CapacityError::OutOfRange { name, expected: "at least 1", got: "0".to_owned() });
            }
        }
        if let Some(heads) = attention_heads
            && (heads == 0 || !heads.is_multiple_of(kv_heads))
        {
            return Err(CapacityError::OutOfRange {
                name: "attention_heads",
                expected: "a positive multiple of kv_heads",
                got: heads.to_string(),
            });
        }
        Ok(Self {
            params,
            params_source: ParamsSource::Given,
            estimated_params: None,
            layers,
            attention_heads,
            kv_heads,
            head_dim,
            hidden_size: None,
            config_dtype: None,
            notes: Vec::new(),
        })
    }

    /// A shape from the text of a Hugging Face `config.json`. `params` is the published
    /// count when known; without it the count is estimated from the layer sizes.
    pub fn from_hf_config(json: &str, params: Option<f64>) -> Result<Self, CapacityError> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| CapacityError::ModelConfig(format!("not JSON: {e}")))?;
        // Multimodal checkpoints (Llama 4, Gemma 3, Mistral 3) nest the language model's
        // sizes under text_config; the quantisation stays at the top.
        let top: HfConfig = serde_json::from_value(value.clone())
            .map_err(|e| CapacityError::ModelConfig(format!("unexpected field type: {e}")))?;
        let c = match value.get("text_config") {
            Some(text) if top.num_hidden_layers.is_none() => serde_json::from_value::<HfConfig>(text.clone())
                .map_err(|e| CapacityError::ModelConfig(format!("text_config: unexpected field type: {e}")))?,
            _ => HfConfig::default(),
        };
        let (c, quant) = if c.num_hidden_layers.is_some() { (c, top.quantization_config) } else { (top, None) };
        let quant = c.quantization_config.as_ref().or(quant.as_ref()).and_then(|q| q.quant_method.clone());

        let layers = required("num_hidden_layers", c.num_hidden_layers)?;
        let heads = required("num_attention_heads", c.num_attention_heads)?;
        // Without num_key_value_heads a model has plain multi-head attention: one KV head per query head.
        let kv_heads = count("num_key_value_heads", c.num_key_value_heads.unwrap_or(u64::from(heads)))?;
        if !heads.is_multiple_of(kv_heads) {
            return Err(CapacityError::ModelConfig(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let hidden = c.hidden_size.map(|h| count("hidden_size", h)).transpose()?;
        let head_dim = match (c.head_dim, hidden) {
            (Some(d), _) => count("head_dim", d)?,
            (None, Some(h)) if h.is_multiple_of(heads) => h / heads,
            (None, Some(h)) => {
                return Err(CapacityError::ModelConfig(format!(
                    "head_dim is missing and hidden_size {h} is not a multiple of num_attention_heads {heads}"
                )));
            }
            (None, None) => return Err(CapacityError::ModelConfig("head_dim and hidden_size are both missing".into())),
        };

        let mut notes = Vec::new();
        if c.kv_lora_rank.is_some() {
            notes.push(
                "multi-head latent attention (kv_lora_rank) is estimated as ordinary attention: \
                 the KV cache figure is too high"
                    .to_owned(),
            );
        }
        let given = params.is_some();
        let estimated = estimate_params(&c, layers, heads, kv_heads, head_dim, hidden);
        let params = match (params, &estimated) {
            (Some(p), _) => positive("params", p)?,
            (None, Ok(p)) => *p,
            (None, Err(why)) => {
                return Err(CapacityError::ModelConfig(format!(
                    "cannot estimate the parameter count ({why}): pass --params, e.g. --params 8B"
                )));
            }
        };
        let config_dtype = config_dtype(c.torch_dtype.as_deref().or(c.dtype.as_deref()), quant.as_deref(), &mut notes);
        Ok(Self {
            params,
            params_source: if given { ParamsSource::Given } else { ParamsSource::Estimated },
            estimated_params: estimated.ok(),
            layers,
            attention_heads: Some(heads),
            kv_heads,
            head_dim,
            hidden_size: hidden,
            config_dtype,
            notes,
        })
    }
}

/// Estimates a decoder's parameter count from its sizes, Llama-style:
///
/// - embeddings: vocab × hidden, twice unless `tie_word_embeddings` (the output head);
/// - attention per layer: q and o are hidden × (heads × head_dim), k and v are
///   hidden × (kv_heads × head_dim) each, which is 4 × hidden² without grouped-query attention;
/// - MLP per layer: gate, up and down projections, 3 × hidden × intermediate_size;
///   a mixture of experts has one MLP per routed expert (of moe_intermediate_size when
///   given), its shared experts and a router; DeepSeek's first_k_dense_replace layers are dense;
/// - two RMSNorm weight vectors per layer and a final one.
///
/// Biases (Qwen's qkv bias), rotary tables and vision towers are left out: they are far
/// below the 2 % this is tested to.
fn estimate_params(
    c: &HfConfig,
    layers: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    hidden: Option<u32>,
) -> Result<f64, String> {
    let h = f64::from(hidden.ok_or("no hidden_size")?);
    let inter = c.intermediate_size.ok_or("no intermediate_size")? as f64;
    let vocab = c.vocab_size.ok_or("no vocab_size")? as f64;
    let layers_f = f64::from(layers);
    let q_dim = f64::from(heads) * f64::from(head_dim);
    let kv_dim = f64::from(kv_heads) * f64::from(head_dim);
    // Most configs default to tied embeddings only when they say so.
    let embed = vocab * h * if c.tie_word_embeddings.unwrap_or(false) { 1.0 } else { 2.0 };
    let attention = 2.0 * h * q_dim + 2.0 * h * kv_dim;
    let dense_mlp = 3.0 * h * inter;
    let experts = c.num_local_experts.or(c.n_routed_experts).or(c.num_experts).filter(|&e| e > 1);
    let mlp_total = match experts {
        None => layers_f * dense_mlp,
        Some(experts) => {
            let expert_inter = c.moe_intermediate_size.unwrap_or(c.intermediate_size.unwrap_or(0)) as f64;
            let expert = 3.0 * h * expert_inter;
            let shared = c.n_shared_experts.unwrap_or(0) as f64 * expert
                + 3.0 * h * c.shared_expert_intermediate_size.unwrap_or(0) as f64;
            let moe = experts as f64 * expert + shared + h * experts as f64;
            let dense_layers = (c.first_k_dense_replace.unwrap_or(0) as f64).min(layers_f);
            dense_layers * dense_mlp + (layers_f - dense_layers) * moe
        }
    };
    let norms = layers_f * 2.0 * h + h;
    let total = embed + layers_f * attention + mlp_total + norms;
    if total.is_finite() && total > 0.0 { Ok(total) } else { Err("the sizes give no finite count".to_owned()) }
}

/// The checkpoint's storage type, from `quantization_config.quant_method` or `torch_dtype`.
fn config_dtype(torch_dtype: Option<&str>, quant: Option<&str>, notes: &mut Vec<String>) -> Option<Dtype> {
    if let Some(method) = quant {
        return match method.to_ascii_lowercase().as_str() {
            "awq" => Some(Dtype::Awq),
            "gptq" => Some(Dtype::Gptq),
            "fp8" => Some(Dtype::Fp8),
            other => {
                notes.push(format!("quantization_config.quant_method {other:?} is not recognised: pass --dtype"));
                None
            }
        };
    }
    match torch_dtype? {
        "bfloat16" => Some(Dtype::Bf16),
        "float16" => Some(Dtype::Fp16),
        "float32" => Some(Dtype::Fp32),
        _ => None,
    }
}

/// Reads a count such as `8B`, `70.6B`, `7240M`, `500K`, `1.5T`, `8e9` or `8030261248`.
pub fn parse_count(name: &'static str, s: &str) -> Result<f64, CapacityError> {
    let bad = || CapacityError::BadCount { name, got: s.to_owned() };
    let t: String = s.trim().chars().filter(|c| *c != '_' && *c != ',').collect();
    let (digits, scale) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('B') => (&t[..t.len() - 1], 1e9),
        Some('T') => (&t[..t.len() - 1], 1e12),
        _ => (t.as_str(), 1.0),
    };
    let v: f64 = digits.trim().parse().map_err(|_| bad())?;
    // `inf` and `nan` parse as f64; they are not counts.
    let v = v * scale;
    if v.is_finite() && v > 0.0 { Ok(v) } else { Err(bad()) }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// meta-llama/Llama-3.1-8B-Instruct's config.json (the fields that matter).
    pub(crate) const LLAMA_3_1_8B: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "rope_type": "llama3"}, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "vocab_size": 128256
    }"#;
    /// meta-llama/Llama-3.1-70B-Instruct.
    pub(crate) const LLAMA_3_1_70B: &str = r#"{
        "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
        "num_hidden_layers": 80, "num_key_value_heads": 8, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "vocab_size": 128256
    }"#;
    /// mistralai/Mistral-7B-v0.1.
    const MISTRAL_7B: &str = r#"{
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "vocab_size": 32000, "sliding_window": 4096
    }"#;
    /// mistralai/Mixtral-8x7B-v0.1: eight experts of Mistral-7B's MLP.
    const MIXTRAL_8X7B: &str = r#"{
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 32000
    }"#;

    fn within(estimate: f64, published: f64, rel: f64) {
        assert!(
            (estimate - published).abs() <= rel * published,
            "estimate {estimate:.4e} vs published {published:.4e}"
        );
    }

    #[test]
    fn estimates_match_published_counts() {
        let m = ModelShape::from_hf_config(LLAMA_3_1_8B, None).unwrap();
        assert_eq!(m.params_source, ParamsSource::Estimated);
        within(m.params, 8.03e9, 0.02);
        assert_eq!((m.layers, m.kv_heads, m.head_dim, m.attention_heads), (32, 8, 128, Some(32)));
        assert_eq!(m.config_dtype, Some(Dtype::Bf16));

        let m = ModelShape::from_hf_config(LLAMA_3_1_70B, None).unwrap();
        within(m.params, 70.6e9, 0.02);
        assert_eq!((m.layers, m.kv_heads, m.head_dim), (80, 8, 128));

        let m = ModelShape::from_hf_config(MISTRAL_7B, None).unwrap();
        within(m.params, 7.24e9, 0.02);
        assert_eq!((m.layers, m.kv_heads, m.head_dim), (32, 8, 128));

        within(ModelShape::from_hf_config(MIXTRAL_8X7B, None).unwrap().params, 46.7e9, 0.02);
    }

    #[test]
    fn a_given_count_wins_and_the_estimate_is_kept() {
        let m = ModelShape::from_hf_config(LLAMA_3_1_8B, Some(8.03e9)).unwrap();
        assert_eq!(m.params, 8.03e9);
        assert_eq!(m.params_source, ParamsSource::Given);
        assert!(m.estimated_params.is_some());
    }

    #[test]
    fn nested_text_config_and_quantisation_are_read() {
        let json = r#"{"quantization_config": {"quant_method": "awq", "bits": 4},
            "text_config": {"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000}}"#;
        let m = ModelShape::from_hf_config(json, None).unwrap();
        assert_eq!(m.layers, 32);
        assert_eq!(m.config_dtype, Some(Dtype::Awq));
    }

    #[test]
    fn kv_heads_default_to_attention_heads_and_head_dim_to_hidden_over_heads() {
        let json = r#"{"hidden_size": 2048, "num_attention_heads": 16, "num_hidden_layers": 4}"#;
        let m = ModelShape::from_hf_config(json, Some(1e9)).unwrap();
        assert_eq!((m.kv_heads, m.head_dim), (16, 128));
        assert_eq!(m.estimated_params, None, "no intermediate_size or vocab_size");
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let err = |json: &str| ModelShape::from_hf_config(json, None).unwrap_err().to_string();
        assert!(err("{").contains("not JSON"));
        assert!(err("{}").contains("num_hidden_layers is missing"));
        assert!(err(r#"{"num_hidden_layers": 2, "num_attention_heads": 0}"#).contains("num_attention_heads"));
        assert!(err(r#"{"num_hidden_layers": "x"}"#).contains("unexpected field type"));
        assert!(
            err(r#"{"num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 5, "head_dim": 8}"#)
                .contains("not a multiple")
        );
        assert!(err(r#"{"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 8}"#).contains("pass --params"));
    }

    #[test]
    fn explicit_shapes_are_checked() {
        assert!(ModelShape::new(8e9, 32, 8, 128, None).is_ok());
        assert!(ModelShape::new(f64::NAN, 32, 8, 128, None).is_err());
        assert!(ModelShape::new(8e9, 0, 8, 128, None).unwrap_err().to_string().starts_with("layers"));
        assert!(ModelShape::new(8e9, 32, 8, 128, Some(12)).is_err());
    }

    #[test]
    fn counts_parse_with_suffixes() {
        assert_eq!(parse_count("params", "8B"), Ok(8e9));
        assert_eq!(parse_count("params", "70.6b"), Ok(70.6e9));
        assert_eq!(parse_count("params", "7240M"), Ok(7.24e9));
        assert_eq!(parse_count("params", "1.5T"), Ok(1.5e12));
        assert_eq!(parse_count("params", "8e9"), Ok(8e9));
        assert_eq!(parse_count("params", "8_030_261_248"), Ok(8_030_261_248.0));
        for bad in ["", "B", "-8B", "0", "nan", "infB", "8X", "8 billion"] {
            assert!(parse_count("params", bad).is_err(), "{bad}");
        }
    }
}
