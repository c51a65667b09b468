//! Model files on std targets: a GGUF file, or a Hugging Face directory (config.json,
//! model.safetensors or a sharded index, tokenizer.json), optionally quantised at load.

use super::config::{Arch, Config};
use super::llama::{GgufSource, HostTensor, Model, Role, TensorSource};
use crate::backend::{Backend, RopeScaling, RopeStyle};
use crate::error::{Error, Result};
use crate::format::file::{GgufFile, MappedFile};
use crate::quant::{self, WeightType};
use crate::tokenizer::Tokenizer;
use core::cell::Cell;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::prelude::v1::*;

fn io(path: &Path, message: impl core::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// One safetensors file: its map and validated header.
#[derive(Debug)]
struct Shard {
    file: MappedFile,
    header_len: usize,
    meta: safetensors::tensor::Metadata,
}

/// A Hugging Face model directory.
#[derive(Debug)]
pub struct HfDir {
    dir: PathBuf,
    config: Config,
    shards: Vec<Shard>,
    /// Tensor name -> shard index.
    index: HashMap<String, usize>,
    quantize: Option<WeightType>,
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    serde_json::from_str(&text).map_err(|e| io(path, e))
}

/// The model's shape from config.json.
pub fn config_from_json(c: &Json, path: &Path) -> Result<Config> {
    let bad = |what: String| io(path, what);
    let int = |k: &str| -> Result<u32> {
        c.get(k)
            .and_then(Json::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| v > 0)
            .ok_or_else(|| bad(format!("`{k}` is missing or not a positive integer")))
    };
    let arch = match c.get("model_type").and_then(Json::as_str) {
        Some("llama" | "mistral") => Arch::Llama,
        Some("qwen2") => Arch::Qwen2,
        other => {
            return Err(bad(format!(
                "model_type {other:?} is not supported (llama, mistral, qwen2 are)"
            )));
        }
    };
    // transformers 5 writes `rope_parameters`; earlier versions `rope_theta` and `rope_scaling`.
    let rope = c.get("rope_parameters").filter(|v| !v.is_null());
    let rope_theta = rope
        .and_then(|r| r.get("rope_theta"))
        .or_else(|| c.get("rope_theta"))
        .and_then(Json::as_f64)
        .unwrap_or(10_000.0);
    let dim = int("hidden_size")?;
    let n_heads = int("num_attention_heads")?;
    let head_dim = if c.get("head_dim").is_some_and(|v| !v.is_null()) {
        int("head_dim")?
    } else {
        dim / n_heads
    };
    let mut rope_scaling = RopeScaling::None;
    if let Some(s) = rope.or_else(|| c.get("rope_scaling").filter(|v| !v.is_null())) {
        let num = |k: &str| -> Result<f64> {
            s.get(k)
                .and_then(Json::as_f64)
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| bad(format!("rope scaling `{k}` is missing or not positive")))
        };
        rope_scaling = match s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Json::as_str)
        {
            Some("default") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear(num("factor")?),
            Some("llama3") => RopeScaling::llama3(
                rope_theta,
                head_dim,
                num("factor")?,
                num("low_freq_factor")?,
                num("high_freq_factor")?,
                num("original_max_position_embeddings")?,
            ),
            other => {
                return Err(bad(format!(
                    "rope scaling {other:?} is not supported yet (linear and llama3 are)"
                )));
            }
        };
    }
    let cfg = Config {
        arch,
        n_layers: int("num_hidden_layers")?,
        dim,
        ffn_dim: int("intermediate_size")?,
        n_heads,
        n_kv_heads: if c.get("num_key_value_heads").is_some() {
            int("num_key_value_heads")?
        } else {
            n_heads
        },
        head_dim,
        vocab: int("vocab_size")?,
        context: int("max_position_embeddings")?,
        rope_theta,
        // Hugging Face checkpoints rotate (x[i], x[i + d/2]).
        rope_style: RopeStyle::HalfSplit,
        rope_scaling,
        rms_eps: c.get("rms_norm_eps").and_then(Json::as_f64).unwrap_or(1e-6) as f32,
        tied_embeddings: c
            .get("tie_word_embeddings")
            .and_then(Json::as_bool)
            .unwrap_or(false),
    };
    cfg.validate()?;
    Ok(cfg)
}

impl HfDir {
    pub fn open(dir: &Path, quantize: Option<WeightType>) -> Result<HfDir> {
        if !matches!(quantize, None | Some(WeightType::Q8_0 | WeightType::Q4_0)) {
            return Err(io(dir, "--quantize takes q8_0 or q4_0"));
        }
        let config = config_from_json(
            &read_json(&dir.join("config.json"))?,
            &dir.join("config.json"),
        )?;
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index_path.exists() {
            let idx = read_json(&index_path)?;
            let map = idx
                .get("weight_map")
                .and_then(Json::as_object)
                .ok_or_else(|| io(&index_path, "no weight_map"))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(Json::as_str)
                .map(str::to_owned)
                .collect();
            files.sort();
            files.dedup();
            files
        } else {
            vec!["model.safetensors".into()]
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for name in files {
            // Shard names are data: only plain file names inside the directory are accepted.
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                return Err(io(
                    &index_path,
                    format!("shard name `{name}` is not a plain file name"),
                ));
            }
            let path = dir.join(&name);
            let file = MappedFile::open(&path)?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(file.bytes()).map_err(|e| io(&path, e))?;
            for tensor in meta.tensors().keys() {
                if index.insert(tensor.clone(), shards.len()).is_some() {
                    return Err(io(
                        &path,
                        format!("tensor `{tensor}` appears in two shards"),
                    ));
                }
            }
            shards.push(Shard {
                file,
                header_len,
                meta,
            });
        }
        Ok(HfDir {
            dir: dir.to_owned(),
            config,
            shards,
            index,
            quantize,
        })
    }

    fn name(role: Role) -> String {
        let l = |i: u32, s: &str| format!("model.layers.{i}.{s}");
        match role {
            Role::Embed => "model.embed_tokens.weight".into(),
            Role::OutputNorm => "model.norm.weight".into(),
            Role::Output => "lm_head.weight".into(),
            Role::AttnNorm(i) => l(i, "input_layernorm.weight"),
            Role::Q(i) => l(i, "self_attn.q_proj.weight"),
            Role::K(i) => l(i, "self_attn.k_proj.weight"),
            Role::V(i) => l(i, "self_attn.v_proj.weight"),
            Role::O(i) => l(i, "self_attn.o_proj.weight"),
            Role::QBias(i) => l(i, "self_attn.q_proj.bias"),
            Role::KBias(i) => l(i, "self_attn.k_proj.bias"),
            Role::VBias(i) => l(i, "self_attn.v_proj.bias"),
            Role::FfnNorm(i) => l(i, "post_attention_layernorm.weight"),
            // Hugging Face configs describe rope scaling in config.json instead.
            Role::RopeFreqs => String::new(),
            Role::Gate(i) => l(i, "mlp.gate_proj.weight"),
            Role::Up(i) => l(i, "mlp.up_proj.weight"),
            Role::Down(i) => l(i, "mlp.down_proj.weight"),
        }
    }
}

impl TensorSource for HfDir {
    fn tensor(&self, role: Role) -> Result<Option<HostTensor<'_>>> {
        let name = Self::name(role);
        let Some(&s) = self.index.get(&name) else {
            return Ok(None);
        };
        let shard = &self.shards[s];
        let path = self.dir.join(shard.file.path());
        let info = shard
            .meta
            .info(&name)
            .ok_or_else(|| io(&path, format!("`{name}` vanished")))?;
        let wtype = match info.dtype {
            safetensors::Dtype::F32 => WeightType::F32,
            safetensors::Dtype::F16 => WeightType::F16,
            safetensors::Dtype::BF16 => WeightType::BF16,
            other => {
                return Err(io(
                    &path,
                    format!("`{name}` has dtype {other:?} (f32, f16, bf16 are supported)"),
                ));
            }
        };
        let (rows, cols) = match info.shape[..] {
            [n] => (1, n as u64),
            [r, c] => (r as u64, c as u64),
            _ => return Err(io(&path, format!("`{name}` has shape {:?}", info.shape))),
        };
        // read_metadata checked that the offsets lie in the buffer after the header.
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let data = shard
            .file
            .bytes()
            .get(start..end)
            .ok_or_else(|| io(&path, format!("`{name}` lies outside the file")))?;
        let mut t = HostTensor {
            name,
            wtype,
            rows,
            cols,
            data: data.into(),
        };
        // Load-time quantisation of the projections and embeddings (not of norms and
        // biases); rows that are not whole 32-blocks stay as they are.
        let is_matrix = !matches!(
            role,
            Role::OutputNorm
                | Role::AttnNorm(_)
                | Role::FfnNorm(_)
                | Role::QBias(_)
                | Role::KBias(_)
                | Role::VBias(_)
        );
        if let (Some(q), true) = (self.quantize, is_matrix && cols.is_multiple_of(32)) {
            let mut f = vec![0.0f32; (rows * cols) as usize];
            quant::dequantize(wtype, &t.data, &mut f)?;
            t.data = match q {
                WeightType::Q4_0 => quant::quantize_q4_0(&f)?,
                _ => quant::quantize_q8_0(&f)?,
            }
            .into();
            t.wtype = q;
        }
        Ok(Some(t))
    }
}

/// A GGUF source that lets each tensor's pages go once the next one is asked for (by then
/// the loader has uploaded it), so a model's file and its device copy are not both resident.
struct Releasing<'a> {
    file: &'a GgufFile,
    inner: GgufSource<'a>,
    last: Cell<Option<core::ops::Range<usize>>>,
}

impl TensorSource for Releasing<'_> {
    fn tensor(&self, role: Role) -> Result<Option<HostTensor<'_>>> {
        if let Some(range) = self.last.take() {
            self.file.release_range(range);
        }
        let t = self.inner.tensor(role)?;
        if let Some(t) = &t {
            // Only data borrowed from the map has pages to let go.
            let base = self.file.bytes().as_ptr() as usize;
            if let Some(start) = (t.data.as_ptr() as usize).checked_sub(base) {
                // Whole pages only: a page shared with the next tensor is kept.
                let page = 4096;
                self.last.set(Some(
                    start.div_ceil(page) * page..(start + t.data.len()) / page * page,
                ));
            }
        }
        Ok(t)
    }
}

/// A model on disk, whichever its format.
#[derive(Debug)]
pub enum ModelFiles {
    Gguf(GgufFile),
    Hf(HfDir),
}

impl ModelFiles {
    /// A .gguf file, or a directory with config.json and safetensors (quantised at load to
    /// `quantize`, q8_0 or q4_0, if given).
    pub fn open(path: &Path, quantize: Option<WeightType>) -> Result<ModelFiles> {
        if path.is_dir() {
            return Ok(ModelFiles::Hf(HfDir::open(path, quantize)?));
        }
        if quantize.is_some() {
            return Err(io(
                path,
                "--quantize applies to safetensors models; a GGUF file is already quantised",
            ));
        }
        Ok(ModelFiles::Gguf(GgufFile::open(path)?))
    }

    pub fn config(&self) -> Result<Config> {
        match self {
            ModelFiles::Gguf(f) => Config::from_gguf(&f.header),
            ModelFiles::Hf(d) => Ok(d.config.clone()),
        }
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            ModelFiles::Gguf(f) => Tokenizer::from_gguf(&f.header),
            ModelFiles::Hf(d) => Tokenizer::from_file(&d.dir.join("tokenizer.json")),
        }
    }

    /// Loads the model onto `backend`, then lets the file's pages go: the weights now live
    /// in the backend's buffers.
    pub fn load<'b, B: Backend>(&self, backend: &'b B) -> Result<Model<'b, B>> {
        match self {
            ModelFiles::Gguf(f) => {
                let source = Releasing {
                    file: f,
                    inner: GgufSource {
                        gguf: &f.header,
                        bytes: f.bytes(),
                    },
                    last: Cell::new(None),
                };
                let m = Model::load(backend, Config::from_gguf(&f.header)?, &source);
                f.release_pages();
                m
            }
            ModelFiles::Hf(d) => {
                let m = Model::load(backend, d.config.clone(), d);
                d.shards.iter().for_each(|s| s.file.release_pages());
                m
            }
        }
    }
}
