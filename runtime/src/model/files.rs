//! Model files on std targets: a GGUF file, or a Hugging Face directory (config.json,
//! model.safetensors or a sharded index, tokenizer.json), optionally quantised at load.

use super::config::{Arch, Config, Field, Origin, layers_present, positive_f32};
use super::llama::{GgufSource, HostTensor, Model, Role, TensorSource};
use crate::backend::{Backend, RopeScaling, RopeStyle};
use crate::error::{Error, Result};
use crate::format::file::{FileKind, GgufFile, MappedFile, read_json};
use crate::guard::guarded;
use crate::quant::{self, WeightType};
use crate::tokenizer::Tokenizer;
use core::cell::Cell;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::prelude::v1::*;

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

/// config.json's values, read by type: `null` counts as absent (transformers writes it for
/// unset options), a value of the wrong type is an error, never a default.
struct JsonKeys<'a> {
    obj: &'a serde_json::Map<String, Json>,
    origin: &'a Origin,
    /// Prefix of keys inside a nested object (`rope_scaling.`), for messages.
    prefix: &'a str,
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

impl<'a> JsonKeys<'a> {
    fn error(&self, key: &str, reason: String) -> Error {
        self.origin
            .key_error(format!("{}{key}", self.prefix), reason)
    }

    fn get<T>(
        &self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'a Json) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.obj.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => convert(v).map(Some).ok_or_else(|| {
                self.error(
                    key,
                    format!("is {} ({v}), expected {expected}", json_kind(v)),
                )
            }),
        }
    }

    fn count(&self, key: &str) -> Result<Option<u32>> {
        self.get(key, "an integer in 1..=4294967295", |v| {
            v.as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| v > 0)
        })
    }

    fn required_count(&self, key: &str) -> Result<u32> {
        self.count(key)?
            .ok_or_else(|| self.error(key, "is missing".into()))
    }

    /// A float that scales or divides: finite and positive.
    fn positive(&self, key: &str) -> Result<Option<f64>> {
        self.get(key, "a finite positive number", |v| {
            v.as_f64().filter(|v| v.is_finite() && *v > 0.0)
        })
    }

    fn required_positive(&self, key: &str) -> Result<f64> {
        self.positive(key)?
            .ok_or_else(|| self.error(key, "is missing".into()))
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key, "a string", Json::as_str)
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        self.get(key, "a boolean", Json::as_bool)
    }

    fn object(&self, key: &str) -> Result<Option<&'a serde_json::Map<String, Json>>> {
        self.get(key, "an object", Json::as_object)
    }
}

/// The model's shape from config.json (`path` names it in errors). Counts are checked
/// against each other here and against the tensors by [`HfDir::open`].
pub fn config_from_json(c: &Json, path: &Path) -> Result<Config> {
    let origin = Origin::Json {
        file: path.display().to_string(),
    };
    let obj = c.as_object().ok_or_else(|| {
        origin.key_error(
            "(top level)".into(),
            format!("is {}, expected an object", json_kind(c)),
        )
    })?;
    let keys = JsonKeys {
        obj,
        origin: &origin,
        prefix: "",
    };
    let arch = match keys.string("model_type")? {
        Some("llama" | "mistral") => Arch::Llama,
        Some("qwen2") => Arch::Qwen2,
        other => {
            return Err(keys.error(
                "model_type",
                format!("{other:?} is not supported (llama, mistral, qwen2 are)"),
            ));
        }
    };
    // transformers 5 writes `rope_parameters`; earlier versions `rope_theta` and `rope_scaling`.
    let (rope, rope_key) = match keys.object("rope_parameters")? {
        Some(r) => (Some(r), "rope_parameters"),
        None => (keys.object("rope_scaling")?, "rope_scaling"),
    };
    let rope_theta = match rope.map(|r| JsonKeys {
        obj: r,
        origin: &origin,
        prefix: "rope_parameters.",
    }) {
        Some(r) if rope_key == "rope_parameters" && r.obj.contains_key("rope_theta") => {
            r.positive("rope_theta")?
        }
        _ => keys.positive("rope_theta")?,
    }
    .unwrap_or(10_000.0);
    let dim = keys.required_count("hidden_size")?;
    let n_heads = keys.required_count("num_attention_heads")?;
    let mut cfg = Config {
        arch,
        n_layers: keys.required_count("num_hidden_layers")?,
        dim,
        ffn_dim: keys.required_count("intermediate_size")?,
        n_heads,
        n_kv_heads: keys.count("num_key_value_heads")?.unwrap_or(n_heads),
        head_dim: keys.count("head_dim")?.unwrap_or(dim / n_heads),
        vocab: keys.required_count("vocab_size")?,
        context: keys.required_count("max_position_embeddings")?,
        rope_theta,
        // Hugging Face checkpoints rotate (x[i], x[i + d/2]).
        rope_style: RopeStyle::HalfSplit,
        rope_scaling: RopeScaling::None,
        rms_eps: positive_f32(
            &origin,
            Field::RmsEps,
            keys.positive("rms_norm_eps")?.unwrap_or(1e-6),
        )?,
        tied_embeddings: keys.boolean("tie_word_embeddings")?.unwrap_or(false),
        origin: origin.clone(),
    };
    // The shape first: Llama 3's divisors are sized by the head dimension.
    cfg.validate()?;
    if let Some(s) = rope {
        let prefix = format!("{rope_key}.");
        let r = JsonKeys {
            obj: s,
            origin: &origin,
            prefix: &prefix,
        };
        let kind = match r.string("rope_type")? {
            Some(k) => Some(k),
            None => r.string("type")?,
        };
        cfg.rope_scaling = match kind {
            None | Some("default") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear(r.required_positive("factor")?),
            Some("llama3") => {
                let (low, high) = (
                    r.required_positive("low_freq_factor")?,
                    r.required_positive("high_freq_factor")?,
                );
                if high <= low {
                    return Err(r.error(
                        "high_freq_factor",
                        format!("{high} must be greater than low_freq_factor {low}"),
                    ));
                }
                RopeScaling::llama3(
                    cfg.rope_theta,
                    cfg.head_dim,
                    r.required_positive("factor")?,
                    low,
                    high,
                    r.required_positive("original_max_position_embeddings")?,
                )
            }
            Some(other) => {
                return Err(r.error(
                    "rope_type",
                    format!("`{other}` is not supported yet (default, linear and llama3 are)"),
                ));
            }
        };
        cfg.validate()?;
    }
    Ok(cfg)
}

/// The header of a safetensors file (`name` for errors): its length and tensor index,
/// read by the `safetensors` crate behind the panic boundary. The crate caps the header
/// and checks that the tensors cover the data exactly.
pub fn safetensors_header(
    bytes: &[u8],
    name: &str,
) -> Result<(usize, safetensors::tensor::Metadata)> {
    guarded("safetensors", name, || {
        safetensors::SafeTensors::read_metadata(bytes)
    })?
    .map_err(|e| Error::Syntax {
        path: name.to_owned(),
        line: 0,
        column: 0,
        message: format!("not a valid safetensors file: {e}"),
    })
}

/// Checks config.json's layer count, width and vocabulary against the tensors a checkpoint
/// holds (`names`, and `shape` of a tensor by name); `origin` names the checkpoint.
pub fn check_config_against_tensors<'a>(
    c: &Config,
    origin: &str,
    names: impl Iterator<Item = &'a str>,
    shape: impl Fn(&str) -> Option<Vec<usize>>,
) -> Result<()> {
    c.check_layers(layers_present(names, "model.layers."))?;
    let name = HfDir::name(Role::Embed);
    let shape = shape(&name).ok_or_else(|| Error::Tensor {
        file: origin.to_owned(),
        tensor: name.clone(),
        reason: "is missing".into(),
    })?;
    if shape != [c.vocab as usize, c.dim as usize] {
        return Err(Error::Tensor {
            file: origin.to_owned(),
            tensor: name,
            reason: format!(
                "has shape {shape:?} but {} says [{}, {}] ({}, {})",
                c.origin.file(),
                c.vocab,
                c.dim,
                c.origin.key(Field::Vocab),
                c.origin.key(Field::Dim)
            ),
        });
    }
    Ok(())
}

impl HfDir {
    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its number of layers (config.json's).
    pub fn layers(&self) -> u32 {
        self.config.n_layers
    }

    pub fn open(dir: &Path, quantize: Option<WeightType>) -> Result<HfDir> {
        if !matches!(quantize, None | Some(WeightType::Q8_0 | WeightType::Q4_0)) {
            return Err(Error::InvalidArgument {
                name: "quantize",
                reason: format!("{quantize:?}: load-time quantisation takes Q8_0 or Q4_0"),
            });
        }
        let config_path = dir.join("config.json");
        let config = config_from_json(&read_json(&config_path, FileKind::Config)?, &config_path)?;
        let index_path = dir.join("model.safetensors.index.json");
        let indexed = index_path.try_exists().map_err(|e| Error::Io {
            path: index_path.display().to_string(),
            message: e.to_string(),
        })?;
        let files: Vec<String> = if indexed {
            let idx = read_json(&index_path, FileKind::ShardIndex)?;
            let bad = |reason: &str| Error::Metadata {
                file: index_path.display().to_string(),
                key: "weight_map".into(),
                reason: reason.into(),
            };
            let map = idx
                .get("weight_map")
                .and_then(Json::as_object)
                .ok_or_else(|| bad("is missing or not an object"))?;
            let mut files = Vec::new();
            for v in map.values() {
                files.push(
                    v.as_str()
                        .ok_or_else(|| bad("maps a tensor to something other than a file name"))?
                        .to_owned(),
                );
            }
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
            if name.is_empty()
                || name.contains('/')
                || name.contains('\\')
                || name.contains('\0')
                || name.starts_with('.')
            {
                return Err(Error::Metadata {
                    file: index_path.display().to_string(),
                    key: "weight_map".into(),
                    reason: format!("shard name `{name}` is not a plain file name"),
                });
            }
            let path = dir.join(&name);
            let file = MappedFile::open(&path)?;
            let shown = path.display().to_string();
            let (header_len, meta) = safetensors_header(file.bytes(), &shown)?;
            for tensor in meta.tensors().keys() {
                if index.insert(tensor.clone(), shards.len()).is_some() {
                    return Err(Error::Tensor {
                        file: shown,
                        tensor: tensor.clone(),
                        reason: "appears in two shards".into(),
                    });
                }
            }
            shards.push(Shard {
                file,
                header_len,
                meta,
            });
        }
        let d = HfDir {
            dir: dir.to_owned(),
            config,
            shards,
            index,
            quantize,
        };
        d.check_against_tensors()?;
        Ok(d)
    }

    /// Bytes of the safetensors files the model is read from.
    pub fn shard_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.file.bytes().len() as u64)
            .sum()
    }

    /// The counts config.json declares against the tensors the shards hold, before any of
    /// them sizes an allocation.
    fn check_against_tensors(&self) -> Result<()> {
        check_config_against_tensors(
            &self.config,
            &self.dir.display().to_string(),
            self.index.keys().map(String::as_str),
            |name| {
                let &s = self.index.get(name)?;
                Some(self.shards[s].meta.info(name)?.shape.clone())
            },
        )
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
    fn name(&self, role: Role) -> String {
        Self::name(role)
    }

    fn origin(&self) -> String {
        self.dir.display().to_string()
    }

    fn tensor(&self, role: Role) -> Result<Option<HostTensor<'_>>> {
        let name = Self::name(role);
        let Some(&s) = self.index.get(&name) else {
            return Ok(None);
        };
        let shard = &self.shards[s];
        let path = shard.file.path().to_owned();
        let bad = |reason: String| Error::Tensor {
            file: path.clone(),
            tensor: name.clone(),
            reason,
        };
        let info = shard
            .meta
            .info(&name)
            .ok_or_else(|| bad("is listed but has no header entry".into()))?;
        let wtype = match info.dtype {
            safetensors::Dtype::F32 => WeightType::F32,
            safetensors::Dtype::F16 => WeightType::F16,
            safetensors::Dtype::BF16 => WeightType::BF16,
            other => {
                return Err(bad(format!(
                    "has dtype {other:?} (F32, F16, BF16 are supported)"
                )));
            }
        };
        let (rows, cols) = match info.shape[..] {
            [n] => (1, n as u64),
            [r, c] => (r as u64, c as u64),
            _ => {
                return Err(bad(format!(
                    "has shape {:?}, not a matrix or vector",
                    info.shape
                )));
            }
        };
        // read_metadata checked that the offsets lie in the buffer after the header.
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let data = shard
            .file
            .bytes()
            .get(start..end)
            .ok_or_else(|| bad("lies outside the file".into()))?;
        let mut t = HostTensor {
            name: name.clone(),
            file: path.clone(),
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
            // safetensors checked that the shape covers the data, so this is bounded by the file.
            let n = usize::try_from(rows * cols).map_err(|_| bad("is too large".into()))?;
            let mut f = vec![0.0f32; n];
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
    fn name(&self, role: Role) -> String {
        self.inner.name(role)
    }

    fn origin(&self) -> String {
        self.inner.origin()
    }

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
            return Err(Error::InvalidArgument {
                name: "quantize",
                reason: format!(
                    "{}: load-time quantisation applies to safetensors models; a GGUF file is already quantised",
                    path.display()
                ),
            });
        }
        Ok(ModelFiles::Gguf(GgufFile::open(path)?))
    }

    pub fn config(&self) -> Result<Config> {
        match self {
            ModelFiles::Gguf(f) => Config::from_gguf(&f.header, f.path()),
            ModelFiles::Hf(d) => Ok(d.config.clone()),
        }
    }

    /// The model's dimensions as adapters see them, without loading it: each target's
    /// block comes from its layer 0 weight (in the file, or the load-time type).
    pub fn dims(&self) -> Result<crate::adapter::Dims> {
        let blocks = crate::adapter::Target::ALL.map(|t| {
            let wtype = match self {
                ModelFiles::Gguf(f) => f
                    .header
                    .tensor(&crate::adapter::gguf::tensor_name(0, t))
                    .and_then(|t| t.ggml_type.weight_type()),
                ModelFiles::Hf(d) => d.quantize,
            };
            quant::scale_block(wtype.unwrap_or(WeightType::F32))
        });
        Ok(crate::adapter::Dims::of(&self.config()?, blocks))
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            ModelFiles::Gguf(f) => Tokenizer::from_gguf(&f.header, f.path()),
            ModelFiles::Hf(d) => Tokenizer::from_file(&d.dir.join("tokenizer.json")),
        }
    }

    /// SHA-256 of what the model is made of: the GGUF file, or each safetensors shard in
    /// order and the load-time quantisation. Pins a training session to its base model.
    pub fn sha256(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        match self {
            ModelFiles::Gguf(f) => {
                h.update(f.bytes());
                f.release_pages();
            }
            ModelFiles::Hf(d) => {
                h.update(format!("quantize={:?}\n", d.quantize).as_bytes());
                for s in &d.shards {
                    h.update(s.file.bytes());
                    s.file.release_pages();
                }
            }
        }
        h.finalize().into()
    }

    /// Loads the model onto `backend`, then lets the file's pages go: the weights now live
    /// in the backend's buffers.
    pub fn load<'b, B: Backend>(
        &self,
        backend: impl Into<crate::held::Held<'b, B>>,
    ) -> Result<Model<'b, B>> {
        match self {
            ModelFiles::Gguf(f) => {
                let source = Releasing {
                    file: f,
                    inner: GgufSource {
                        gguf: &f.header,
                        bytes: f.bytes(),
                        file: f.path(),
                    },
                    last: Cell::new(None),
                };
                let m = Model::load(backend, Config::from_gguf(&f.header, f.path())?, &source);
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
