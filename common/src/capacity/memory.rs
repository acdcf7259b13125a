//! How much GPU memory a model needs to serve: its weights, the KV cache for the
//! context and concurrency asked for, and the serving runtime's own overhead, whole
//! and per GPU at each tensor-parallel size.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::model::ModelShape;
use super::{CapacityError, to_bytes};

/// The context length assumed when none is given: a common serving limit.
pub const DEFAULT_CONTEXT_LENGTH: u64 = 8192;
/// The concurrent sequences assumed when none is given.
pub const DEFAULT_CONCURRENCY: u64 = 16;
/// vLLM's `gpu_memory_utilization` default: the share of each GPU the server may take.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;
/// The fixed runtime allowance per GPU: the CUDA context, cuBLAS and NCCL workspaces and
/// captured CUDA graphs, which vLLM needs whatever the model (about 1-2 GiB in practice).
pub const RUNTIME_FIXED_BYTES_PER_GPU: f64 = 1.5 * GIB;
/// The runtime allowance that grows with the model: activations and temporary buffers
/// of a forward pass, taken as 10 % of the weights each GPU holds.
pub const RUNTIME_WEIGHT_SHARE: f64 = 0.10;
/// Scales and zero points of 4-bit group quantisation (AWQ/GPTQ, group size 128 with
/// 16-bit scales) add about 3 % to the 0.5 bytes per parameter.
pub const FOUR_BIT_SCALE_OVERHEAD: f64 = 0.03;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// How weights (or the KV cache) are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    Bf16,
    Fp16,
    Fp8,
    Int8,
    Int4,
    Awq,
    Gptq,
}

impl Dtype {
    /// Every name, for messages.
    pub const NAMES: &'static str = "fp32, bf16, fp16, fp8, int8, int4, awq, gptq";

    /// Bytes one parameter takes, with the 4-bit formats' scales.
    pub fn bytes_per_param(self) -> f64 {
        match self {
            Dtype::Fp32 => 4.0,
            Dtype::Bf16 | Dtype::Fp16 => 2.0,
            // FP8 and INT8 checkpoints carry one scale per tensor or channel: negligible.
            Dtype::Fp8 | Dtype::Int8 => 1.0,
            Dtype::Int4 | Dtype::Awq | Dtype::Gptq => 0.5 * (1.0 + FOUR_BIT_SCALE_OVERHEAD),
        }
    }

    /// The KV cache type a server picks for weights of this type when told nothing:
    /// vLLM's `kv_cache_dtype=auto` is the model's activation type, which is the weight
    /// type for float checkpoints but 16-bit for quantised ones (they compute in bf16 or fp16).
    pub fn default_kv(self) -> Dtype {
        match self {
            Dtype::Fp32 => Dtype::Fp32,
            Dtype::Bf16 | Dtype::Fp8 | Dtype::Int8 => Dtype::Bf16,
            Dtype::Fp16 | Dtype::Int4 | Dtype::Awq | Dtype::Gptq => Dtype::Fp16,
        }
    }

    /// Bytes of one KV cache element; 4-bit formats are weight formats, not cache types.
    pub fn kv_bytes(self) -> Result<f64, CapacityError> {
        match self {
            Dtype::Fp32 => Ok(4.0),
            Dtype::Bf16 | Dtype::Fp16 => Ok(2.0),
            Dtype::Fp8 | Dtype::Int8 => Ok(1.0),
            Dtype::Int4 | Dtype::Awq | Dtype::Gptq => Err(CapacityError::Unknown {
                what: "KV cache dtype",
                got: self.as_str().to_owned(),
                expected: "fp32, bf16, fp16, fp8, int8",
            }),
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Bf16 => "bf16",
            Dtype::Fp16 => "fp16",
            Dtype::Fp8 => "fp8",
            Dtype::Int8 => "int8",
            Dtype::Int4 => "int4",
            Dtype::Awq => "awq",
            Dtype::Gptq => "gptq",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dtype {
    type Err = CapacityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The long names are torch's, as config.json and vLLM's --dtype spell them.
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "float32" | "float" => Ok(Dtype::Fp32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "fp16" | "float16" | "half" => Ok(Dtype::Fp16),
            "fp8" | "fp8_e4m3" | "fp8_e5m2" => Ok(Dtype::Fp8),
            "int8" => Ok(Dtype::Int8),
            "int4" => Ok(Dtype::Int4),
            "awq" => Ok(Dtype::Awq),
            "gptq" => Ok(Dtype::Gptq),
            _ => Err(CapacityError::Unknown { what: "dtype", got: s.to_owned(), expected: Dtype::NAMES }),
        }
    }
}

/// What to estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryInput {
    pub shape: ModelShape,
    pub dtype: Dtype,
    /// `None`: [`Dtype::default_kv`] of `dtype`.
    pub kv_dtype: Option<Dtype>,
    /// Tokens per sequence (prompt and output), at least 1.
    pub context_length: u64,
    /// Sequences served at once, at least 1.
    pub concurrency: u64,
}

/// The memory a model needs on one GPU (tensor-parallel size 1), and what per-GPU
/// figures at other sizes are derived from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryEstimate {
    pub params: f64,
    pub dtype: Dtype,
    pub kv_dtype: Dtype,
    pub bytes_per_param: f64,
    pub context_length: u64,
    pub concurrency: u64,
    pub weights_bytes: u64,
    /// 2 (K and V) × layers × KV heads × head dim × KV bytes.
    pub kv_cache_bytes_per_token: u64,
    /// Per token × context length × concurrency: every sequence at full length.
    pub kv_cache_bytes: u64,
    /// The runtime allowance on one GPU: 1.5 GiB + 10 % of the weights.
    pub overhead_bytes: u64,
    /// Weights + KV cache + overhead on one GPU.
    pub total_bytes: u64,
    #[serde(skip)]
    kv_heads: u32,
    #[serde(skip)]
    attention_heads: Option<u32>,
    /// Bytes of one KV head for one token, over all layers.
    #[serde(skip)]
    kv_head_token_bytes: f64,
    #[serde(skip)]
    weights: f64,
}

/// The memory each GPU needs at one tensor-parallel size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TpNeed {
    pub tensor_parallel: u32,
    /// Whether the model's heads split over this many GPUs; the figures are meaningless otherwise.
    pub supported: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsupported_reason: Option<String>,
    pub weights_bytes_per_gpu: u64,
    pub kv_cache_bytes_per_gpu: u64,
    pub overhead_bytes_per_gpu: u64,
    pub per_gpu_bytes: u64,
}

/// Estimates the memory to serve `input`: weights = params × bytes per parameter; KV cache
/// = 2 × layers × KV heads × head dim × KV bytes × context × concurrency; overhead per
/// GPU = 1.5 GiB + 10 % of the weights it holds.
pub fn estimate(input: &MemoryInput) -> Result<MemoryEstimate, CapacityError> {
    for (name, v) in [("context_length", input.context_length), ("concurrency", input.concurrency)] {
        if v == 0 {
            return Err(CapacityError::OutOfRange { name, expected: "at least 1", got: "0".to_owned() });
        }
    }
    let shape = &input.shape;
    let kv_dtype = input.kv_dtype.unwrap_or(input.dtype.default_kv());
    let kv_bytes = kv_dtype.kv_bytes()?;
    let bytes_per_param = input.dtype.bytes_per_param();
    let weights = shape.params * bytes_per_param;
    let kv_head_token_bytes = 2.0 * f64::from(shape.layers) * f64::from(shape.head_dim) * kv_bytes;
    let per_token = kv_head_token_bytes * f64::from(shape.kv_heads);
    let kv_cache = per_token * input.context_length as f64 * input.concurrency as f64;
    let overhead = RUNTIME_FIXED_BYTES_PER_GPU + RUNTIME_WEIGHT_SHARE * weights;
    Ok(MemoryEstimate {
        params: shape.params,
        dtype: input.dtype,
        kv_dtype,
        bytes_per_param,
        context_length: input.context_length,
        concurrency: input.concurrency,
        weights_bytes: to_bytes("the weights' size", weights)?,
        kv_cache_bytes_per_token: to_bytes("the KV cache per token", per_token)?,
        kv_cache_bytes: to_bytes("the KV cache", kv_cache)?,
        overhead_bytes: to_bytes("the runtime overhead", overhead)?,
        total_bytes: to_bytes("the total memory", weights + kv_cache + overhead)?,
        kv_heads: shape.kv_heads,
        attention_heads: shape.attention_heads,
        kv_head_token_bytes,
        weights,
    })
}

impl MemoryEstimate {
    /// Why the heads do not split over `tp` GPUs, if they do not. KV heads may also be
    /// replicated when `tp` is a multiple of them, as vLLM does.
    pub fn unsupported_reason(&self, tp: u32) -> Option<String> {
        if tp == 0 {
            return Some("a tensor-parallel size is at least 1".to_owned());
        }
        if let Some(heads) = self.attention_heads
            && !heads.is_multiple_of(tp)
        {
            return Some(format!("{heads} attention heads do not split over {tp} GPUs"));
        }
        let kv = self.kv_heads;
        if !kv.is_multiple_of(tp) && !tp.is_multiple_of(kv) {
            return Some(format!("{kv} KV heads neither split over nor replicate onto {tp} GPUs"));
        }
        None
    }

    /// The per-GPU need at tensor-parallel size `tp`: each GPU holds 1/tp of the weights,
    /// its share of the KV heads (at least one, replicated, when tp exceeds them) and
    /// the runtime overhead for its shard.
    pub fn per_gpu(&self, tp: u32) -> Result<TpNeed, CapacityError> {
        let reason = self.unsupported_reason(tp);
        let tp_f = f64::from(tp.max(1));
        let weights = self.weights / tp_f;
        let kv_heads_per_gpu = (f64::from(self.kv_heads) / tp_f).ceil().max(1.0);
        let tokens = self.context_length as f64 * self.concurrency as f64;
        let kv = kv_heads_per_gpu * self.kv_head_token_bytes * tokens;
        let overhead = RUNTIME_FIXED_BYTES_PER_GPU + RUNTIME_WEIGHT_SHARE * weights;
        Ok(TpNeed {
            tensor_parallel: tp,
            supported: reason.is_none(),
            unsupported_reason: reason,
            weights_bytes_per_gpu: to_bytes("the weights per GPU", weights)?,
            kv_cache_bytes_per_gpu: to_bytes("the KV cache per GPU", kv)?,
            overhead_bytes_per_gpu: to_bytes("the overhead per GPU", overhead)?,
            per_gpu_bytes: to_bytes("the memory per GPU", weights + kv + overhead)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::tests::{LLAMA_3_1_8B, LLAMA_3_1_70B};
    use super::*;

    fn input(shape: ModelShape, dtype: Dtype) -> MemoryInput {
        MemoryInput { shape, dtype, kv_dtype: None, context_length: 8192, concurrency: 16 }
    }

    #[test]
    fn llama_3_1_8b_matches_published_sizes() {
        let shape = ModelShape::new(8.03e9, 32, 8, 128, Some(32)).unwrap();
        let e = estimate(&input(shape.clone(), Dtype::Bf16)).unwrap();
        // 8.03B × 2 bytes: the 16.1 GB of the published bf16 safetensors.
        assert!((e.weights_bytes as f64 - 16.06e9).abs() < 0.01e9, "{}", e.weights_bytes);
        // 2 × 32 layers × 8 KV heads × 128 × 2 bytes = 128 KiB a token.
        assert_eq!(e.kv_cache_bytes_per_token, 128 * 1024);
        assert_eq!(e.kv_cache_bytes, 128 * 1024 * 8192 * 16, "16 GiB for 16 sequences of 8k");
        assert_eq!(e.overhead_bytes, (1.5 * GIB + 0.1 * 16.06e9).round() as u64);
        assert_eq!(e.total_bytes, (16.06e9 + 16.0 * GIB + 1.5 * GIB + 1.606e9).round() as u64);
        // An fp8 KV cache halves it.
        let fp8 = estimate(&MemoryInput { kv_dtype: Some(Dtype::Fp8), ..input(shape.clone(), Dtype::Bf16) }).unwrap();
        assert_eq!(fp8.kv_cache_bytes_per_token, 64 * 1024);
        // Four-bit weights: a quarter of bf16 plus 3 % for scales; the cache stays 16-bit.
        let awq = estimate(&input(shape, Dtype::Awq)).unwrap();
        assert!((awq.weights_bytes as f64 - 8.03e9 * 0.515).abs() < 1e6);
        assert_eq!(awq.kv_dtype, Dtype::Fp16);
        assert_eq!(awq.kv_cache_bytes_per_token, 128 * 1024);
    }

    #[test]
    fn llama_3_1_70b_and_mistral_7b() {
        let e = estimate(&input(ModelShape::new(70.6e9, 80, 8, 128, Some(64)).unwrap(), Dtype::Bf16)).unwrap();
        assert!((e.weights_bytes as f64 - 141.2e9).abs() < 0.1e9, "{}", e.weights_bytes);
        assert_eq!(e.kv_cache_bytes_per_token, 320 * 1024);
        let e = estimate(&input(ModelShape::new(7.24e9, 32, 8, 128, Some(32)).unwrap(), Dtype::Bf16)).unwrap();
        assert!((e.weights_bytes as f64 - 14.48e9).abs() < 0.01e9);
        assert_eq!(e.kv_cache_bytes_per_token, 128 * 1024);
    }

    #[test]
    fn estimates_from_config_agree_with_published_sizes() {
        let e = estimate(&input(ModelShape::from_hf_config(LLAMA_3_1_8B, None).unwrap(), Dtype::Bf16)).unwrap();
        assert!((e.weights_bytes as f64 - 16.06e9).abs() < 0.02 * 16.06e9);
        assert_eq!(e.kv_cache_bytes_per_token, 128 * 1024);
        let e = estimate(&input(ModelShape::from_hf_config(LLAMA_3_1_70B, None).unwrap(), Dtype::Bf16)).unwrap();
        assert!((e.weights_bytes as f64 - 141.2e9).abs() < 0.02 * 141.2e9);
        assert_eq!(e.kv_cache_bytes_per_token, 320 * 1024);
    }

    #[test]
    fn per_gpu_needs_shrink_with_tensor_parallelism() {
        let e = estimate(&input(ModelShape::new(70.6e9, 80, 8, 128, Some(64)).unwrap(), Dtype::Bf16)).unwrap();
        let one = e.per_gpu(1).unwrap();
        let four = e.per_gpu(4).unwrap();
        assert_eq!(one.per_gpu_bytes, e.total_bytes);
        assert_eq!(four.weights_bytes_per_gpu, e.weights_bytes / 4);
        assert_eq!(four.kv_cache_bytes_per_gpu, e.kv_cache_bytes / 4);
        assert_eq!(four.overhead_bytes_per_gpu, (1.5 * GIB + 0.1 * 141.2e9 / 4.0).round() as u64);
        // 16 GPUs: 8 KV heads are replicated, so the cache per GPU stops shrinking at 8.
        let sixteen = e.per_gpu(16).unwrap();
        assert!(sixteen.supported);
        assert_eq!(sixteen.kv_cache_bytes_per_gpu, e.per_gpu(8).unwrap().kv_cache_bytes_per_gpu);
        let three = e.per_gpu(3).unwrap();
        assert!(!three.supported);
        assert!(three.unsupported_reason.unwrap().contains("64 attention heads"));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let shape = ModelShape::new(8e9, 32, 8, 128, None).unwrap();
        let err = |i: MemoryInput| estimate(&i).unwrap_err().to_string();
        assert!(
            err(MemoryInput { context_length: 0, ..input(shape.clone(), Dtype::Bf16) }).starts_with("context_length")
        );
        assert!(err(MemoryInput { concurrency: 0, ..input(shape.clone(), Dtype::Bf16) }).starts_with("concurrency"));
        assert!(
            err(MemoryInput { kv_dtype: Some(Dtype::Awq), ..input(shape.clone(), Dtype::Bf16) }).contains("KV cache")
        );
        let huge = MemoryInput { context_length: u64::MAX, concurrency: u64::MAX, ..input(shape, Dtype::Bf16) };
        assert!(err(huge).contains("overflows"));
        assert_eq!("BFloat16".parse::<Dtype>(), Ok(Dtype::Bf16));
        assert!("int3".parse::<Dtype>().unwrap_err().to_string().contains("fp32, bf16"));
    }
}
