//! Candle models loaded from Hugging Face layouts and GGUF files: the Llama-family decoder
//! (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) with a KV cache we own (prefill once, fork N rows, drop
//! finished rows), and tokenizers with their chat templates.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub mod amx;
pub mod bert;
pub mod chat;
pub mod config;
pub mod decoder;
mod epilogue;
pub mod error;
pub mod gguf;
mod host;
pub mod hub;
pub mod kernels;
pub mod linear;
pub mod lowp;
pub mod packed;
mod panels;
pub mod path;
pub mod rows;

pub use bert::{BertConfig, PackedBert};
pub use chat::{ChatTokenizer, TemplateChoice};
pub use config::{DTypeName, DecoderConfig};
pub use decoder::{Decoder, KvCache};
pub use error::ModelError;
pub use gguf::{GgufModel, inspect as inspect_gguf};
pub use hub::ModelDir;
pub use packed::PackedDecoder;

/// Re-exported so stages name devices and dtypes without depending on candle themselves.
pub use candle_core::{DType, Device, DeviceLocation, Tensor};
