//! Adapter files: PEFT's `adapter_config.json` + `adapter_model.safetensors` for LoRA and
//! IA3 (tensor names, shapes and config keys as `peft` writes and reads them), and the
//! same pair for trainable norms under an edgetune-only `peft_type`.

use super::{AdapterConfig, Method, ParamInfo, Slot, Target};
use crate::error::{Error, Result};
use crate::format::file::{FileKind, read_bounded, read_json, write_atomic};
use crate::guard::guarded;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::prelude::v1::*;

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";
/// `peft_type` of trainable norms, which PEFT has no type for.
const NORMS_TYPE: &str = "EDGETUNE_NORMS";
/// `peft_type` of fully trained weights (the file holds every weight, in f32).
const FULL_TYPE: &str = "EDGETUNE_FULL";
/// `peft_type` of trained block-scale factors (one f32 per block of each target: 32
/// elements, or 256 for the K-quants).
const SCALES_TYPE: &str = "EDGETUNE_SCALES";

/// adapter_config.json for `cfg`.
pub fn config_json(cfg: &AdapterConfig) -> Value {
    let modules: Vec<&str> = cfg.targets.iter().map(|t| t.module()).collect();
    match cfg.method {
        Method::Lora {
            rank,
            alpha,
            rslora,
        } => json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": alpha,
            "use_rslora": rslora,
            "target_modules": modules,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "base_model_name_or_path": null,
        }),
        Method::Ia3 => json!({
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "target_modules": modules,
            "feedforward_modules": cfg.targets.iter().filter(|&&t| t == Target::Down)
                .map(|t| t.module()).collect::<Vec<_>>(),
            "fan_in_fan_out": false,
            "init_ia3_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "base_model_name_or_path": null,
        }),
        Method::Norms => json!({ "peft_type": NORMS_TYPE }),
        Method::Full => json!({ "peft_type": FULL_TYPE }),
        Method::Scales => json!({ "peft_type": SCALES_TYPE, "target_modules": modules }),
    }
}

/// The adapter an adapter_config.json describes; `file` names it in errors. Options
/// edgetune does not implement are refused by name rather than ignored.
pub fn parse_config(v: &Value, file: &str) -> Result<AdapterConfig> {
    let bad = |key: &str, reason: String| Error::Metadata {
        file: file.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let str_of = |key: &str| v.get(key).and_then(Value::as_str);
    let peft_type = str_of("peft_type").ok_or_else(|| bad("peft_type", "is missing".into()))?;
    let targets = || -> Result<Vec<Target>> {
        let list = v
            .get("target_modules")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("target_modules", "must be a list of module names".into()))?;
        list.iter()
            .map(|m| {
                let m = m.as_str().unwrap_or_default();
                Target::parse(m).map_err(|_| {
                    bad(
                        "target_modules",
                        format!("`{m}` is not a Llama projection edgetune adapts"),
                    )
                })
            })
            .collect()
    };
    // Keys whose non-default values change what the adapter computes.
    let unsupported = |key: &str, ok: &dyn Fn(&Value) -> bool| -> Result<()> {
        match v.get(key) {
            Some(x) if !ok(x) => Err(bad(key, format!("{x} is not supported"))),
            _ => Ok(()),
        }
    };
    let empty = |x: &Value| x.is_null() || x.as_object().is_some_and(|o| o.is_empty());
    unsupported("layers_to_transform", &|x| x.is_null())?;
    unsupported("modules_to_save", &|x| x.is_null())?;
    unsupported("fan_in_fan_out", &|x| x == &json!(false))?;
    let mut cfg = match peft_type {
        "LORA" => {
            unsupported("rank_pattern", &empty)?;
            unsupported("alpha_pattern", &empty)?;
            unsupported("bias", &|x| x == "none")?;
            unsupported("use_dora", &|x| x == &json!(false))?;
            let rank = v
                .get("r")
                .and_then(Value::as_u64)
                .and_then(|r| u32::try_from(r).ok())
                .ok_or_else(|| bad("r", "must be a positive integer".into()))?;
            let alpha = v
                .get("lora_alpha")
                .and_then(Value::as_f64)
                .ok_or_else(|| bad("lora_alpha", "must be a number".into()))?
                as f32;
            let rslora = v
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            AdapterConfig {
                method: Method::Lora {
                    rank,
                    alpha,
                    rslora,
                },
                targets: targets()?,
            }
        }
        "IA3" => {
            let targets = targets()?;
            let ff: Vec<Target> = match v.get("feedforward_modules") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|m| Target::parse(m.as_str().unwrap_or_default()))
                    .collect::<Result<_>>()?,
                Some(x) => return Err(bad("feedforward_modules", format!("{x} is not a list"))),
            };
            // edgetune scales the input of down and the output of every other target.
            let want: Vec<Target> = targets
                .iter()
                .copied()
                .filter(|&t| t == Target::Down)
                .collect();
            let mut ff_sorted = ff.clone();
            ff_sorted.sort();
            if ff_sorted != want {
                return Err(bad(
                    "feedforward_modules",
                    "edgetune supports exactly down_proj (when targeted) as feed-forward".into(),
                ));
            }
            AdapterConfig {
                method: Method::Ia3,
                targets,
            }
        }
        NORMS_TYPE => AdapterConfig::norms(),
        FULL_TYPE => AdapterConfig::full(),
        SCALES_TYPE => AdapterConfig::scales(&targets()?),
        other => {
            return Err(bad(
                "peft_type",
                format!(
                    "`{other}` is not one edgetune reads (LORA, IA3, {NORMS_TYPE}, {FULL_TYPE}, {SCALES_TYPE})"
                ),
            ));
        }
    };
    cfg.validate().map_err(|e| bad("adapter", e.to_string()))?;
    Ok(cfg)
}

/// The order of q's and k's output rows in a loaded model. PEFT files (and Hugging Face
/// checkpoints) use Hugging Face's; GGUF Llama checkpoints permute each head's rows for
/// interleaved RoPE (llama.cpp's converter), so LoRA's B and IA3's scales on q and k are
/// permuted at the file boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOrder {
    HuggingFace,
    Interleaved { head_dim: u32 },
}

impl RowOrder {
    pub fn of(cfg: &crate::model::Config) -> RowOrder {
        match cfg.rope_style {
            crate::backend::RopeStyle::Interleaved => RowOrder::Interleaved {
                head_dim: cfg.head_dim,
            },
            crate::backend::RopeStyle::HalfSplit => RowOrder::HuggingFace,
        }
    }

    /// For each model row of `p`, the Hugging Face row it holds (None: the same order).
    fn hf_rows(self, p: &ParamInfo) -> Option<Vec<usize>> {
        let RowOrder::Interleaved { head_dim } = self else {
            return None;
        };
        let permuted = matches!(
            p.slot,
            Slot::LoraB(_, Target::Q | Target::K)
                | Slot::Ia3(_, Target::Q | Target::K)
                | Slot::Weight(_, Target::Q | Target::K)
                | Slot::Bias(_, Target::Q | Target::K)
                | Slot::Scales(_, Target::Q | Target::K)
        );
        let hd = head_dim as usize;
        // Model row h*hd + 2i + s holds Hugging Face row h*hd + s*hd/2 + i.
        (permuted && hd >= 2 && (p.rows as usize).is_multiple_of(hd)).then(|| {
            (0..p.rows as usize)
                .map(|r| {
                    let (h, w) = (r / hd, r % hd);
                    h * hd + (w % 2) * (hd / 2) + w / 2
                })
                .collect()
        })
    }

    /// `v` (rows of `p.cols`) from the model's order to Hugging Face's.
    pub fn to_hf(self, p: &ParamInfo, v: &[f32]) -> Vec<f32> {
        let Some(map) = self.hf_rows(p) else {
            return v.to_vec();
        };
        let c = p.cols as usize;
        let mut out = vec![0.0; v.len()];
        for (r, &hf) in map.iter().enumerate() {
            out[hf * c..(hf + 1) * c].copy_from_slice(&v[r * c..(r + 1) * c]);
        }
        out
    }

    /// `v` from Hugging Face's order to the model's.
    pub fn from_hf(self, p: &ParamInfo, v: &[f32]) -> Vec<f32> {
        let Some(map) = self.hf_rows(p) else {
            return v.to_vec();
        };
        let c = p.cols as usize;
        let mut out = vec![0.0; v.len()];
        for (r, &hf) in map.iter().enumerate() {
            out[r * c..(r + 1) * c].copy_from_slice(&v[hf * c..(hf + 1) * c]);
        }
        out
    }
}

/// Writes the adapter (config and tensors in layout order, rows of a model in `order`) into
/// `dir`, each file atomically.
pub fn save(
    dir: &Path,
    cfg: &AdapterConfig,
    layout: &[ParamInfo],
    values: &[Vec<f32>],
    order: RowOrder,
) -> Result<()> {
    let values: Vec<Vec<f32>> = layout
        .iter()
        .zip(values)
        .map(|(p, v)| order.to_hf(p, v))
        .collect();
    let bytes = safetensors_bytes(layout, &values, "adapter")?;
    write_atomic(&dir.join(WEIGHTS), &bytes)?;
    let text = serde_json::to_string_pretty(&config_json(cfg)).unwrap_or_default();
    write_atomic(&dir.join(CONFIG), text.as_bytes())
}

/// A safetensors file of f32 tensors named and shaped by `layout`.
pub fn safetensors_bytes(layout: &[ParamInfo], values: &[Vec<f32>], what: &str) -> Result<Vec<u8>> {
    safetensors_bytes_with(layout, values, what, &[])
}

/// The string metadata of a safetensors file (`shown` names it in errors).
pub fn safetensors_metadata(bytes: &[u8], shown: &str) -> Result<HashMap<String, String>> {
    let (_, meta) = guarded("safetensors", shown, || {
        safetensors::SafeTensors::read_metadata(bytes)
    })?
    .map_err(|e| Error::Syntax {
        path: shown.to_owned(),
        line: 0,
        column: 0,
        message: format!("not a valid safetensors file: {e}"),
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// [`safetensors_bytes`] with string metadata in the header.
pub fn safetensors_bytes_with(
    layout: &[ParamInfo],
    values: &[Vec<f32>],
    what: &str,
    metadata: &[(&str, String)],
) -> Result<Vec<u8>> {
    let data: Vec<Vec<u8>> = values
        .iter()
        .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = layout
        .iter()
        .zip(&data)
        .map(|(p, d)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![p.rows as usize, p.cols as usize],
                d,
            )
            .map_err(|e| Error::Tensor {
                file: what.to_owned(),
                tensor: p.name.clone(),
                reason: e.to_string(),
            })?;
            Ok((p.name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<HashMap<_, _>>()
    });
    safetensors::serialize(views, meta).map_err(|e| Error::Tensor {
        file: what.to_owned(),
        tensor: String::new(),
        reason: e.to_string(),
    })
}

/// Tensors by name: shape and f32 values.
pub type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// The tensors of a safetensors file by name, as f32 (from F32, F16 or BF16), each with
/// its shape.
pub fn read_tensors(path: &Path) -> Result<Tensors> {
    let shown = path.display().to_string();
    let bytes = read_bounded(path, FileKind::Adapter)?;
    let st = guarded("safetensors", &shown, || {
        safetensors::SafeTensors::deserialize(&bytes).map(|st| {
            st.tensors()
                .into_iter()
                .map(|(name, t)| (name, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
                .collect::<Vec<_>>()
        })
    })?
    .map_err(|e| Error::Syntax {
        path: shown.clone(),
        line: 0,
        column: 0,
        message: format!("not a valid safetensors file: {e}"),
    })?;
    let mut out = HashMap::new();
    for (name, dtype, shape, data) in st {
        let vals: Vec<f32> = match dtype {
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::Tensor {
                    file: shown,
                    tensor: name,
                    reason: format!("dtype {other:?} is not F32, F16 or BF16"),
                });
            }
        };
        out.insert(name, (shape, vals));
    }
    Ok(out)
}

/// The tensors of the safetensors file at `path` in the order of `layout`, each checked by
/// name (PEFT's names with an adapter name, `.lora_A.default.weight`, are accepted too),
/// shape (\[rows, cols\], or flat) and finiteness; a tensor the layout lacks is an error.
pub fn read_layout(path: &Path, layout: &[ParamInfo]) -> Result<Vec<Vec<f32>>> {
    let shown = path.display().to_string();
    let mut tensors = read_tensors(path)?;
    let bad = |tensor: &str, reason: String| Error::Tensor {
        file: shown.clone(),
        tensor: tensor.to_owned(),
        reason,
    };
    let mut values = Vec::with_capacity(layout.len());
    for p in layout {
        let alt = p
            .name
            .replace(".lora_A.weight", ".lora_A.default.weight")
            .replace(".lora_B.weight", ".lora_B.default.weight")
            .replace(".ia3_l", ".ia3_l.default");
        let (shape, v) = tensors
            .remove(&p.name)
            .or_else(|| tensors.remove(&alt))
            .ok_or_else(|| bad(&p.name, "is missing (the layout needs it)".into()))?;
        let want = vec![p.rows as usize, p.cols as usize];
        if shape != want && !(shape.len() == 1 && shape[0] == p.len() as usize) {
            return Err(bad(
                &p.name,
                format!("has shape {shape:?}; the model needs {want:?}"),
            ));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(bad(&p.name, format!("value {i} is not finite")));
        }
        values.push(v);
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(bad(
            extra,
            "does not belong to this model's layout for the adapter (wrong target names or layer count?)".into(),
        ));
    }
    Ok(values)
}

/// Reads an adapter directory: its configuration, and its tensors' values in the order of
/// `layout_of(config)` (the model's layout for it; see [`read_layout`]), with rows in the
/// model's `order`.
pub fn load(
    dir: &Path,
    layout_of: impl FnOnce(&AdapterConfig) -> Vec<ParamInfo>,
    order: RowOrder,
) -> Result<(AdapterConfig, Vec<Vec<f32>>)> {
    let cfg_path = dir.join(CONFIG);
    let cfg = parse_config(
        &read_json(&cfg_path, FileKind::Adapter)?,
        &cfg_path.display().to_string(),
    )?;
    let layout = layout_of(&cfg);
    let values = read_layout(&dir.join(WEIGHTS), &layout)?
        .iter()
        .zip(&layout)
        .map(|(v, p)| order.from_hf(p, v))
        .collect();
    Ok((cfg, values))
}

/// Loads the adapter at `path` onto `model` (which must have none): a PEFT directory, or a
/// llama.cpp GGUF LoRA file; checked against the model's layout for it by name and shape
/// before anything is attached.
/// Writes the adapter attached to `model` (its current values) into `dir` in PEFT format.
pub fn save_attached<B: crate::Backend>(
    dir: &Path,
    model: &crate::model::Model<'_, B>,
) -> Result<()> {
    let cfg = model.adapter().ok_or_else(|| Error::InvalidArgument {
        name: "adapter",
        reason: "the model has none attached".into(),
    })?;
    save(
        dir,
        cfg,
        model.layout(),
        &model.read_params()?,
        RowOrder::of(&model.cfg),
    )
}

pub fn attach_dir<B: crate::Backend>(
    model: &mut crate::model::Model<'_, B>,
    path: &Path,
) -> Result<()> {
    let dims = model.dims();
    let order = RowOrder::of(&model.cfg);
    let (cfg, values) = if path.is_file() {
        super::gguf::load(path, &model.cfg, &dims)?
    } else {
        load(path, |cfg| super::layout(cfg, &dims), order)?
    };
    model.attach(cfg, 0)?;
    model.write_params(&values)
}
