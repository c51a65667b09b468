//! llama.cpp's GGUF LoRA format (`general.type = adapter`, `adapter.type = lora`,
//! `adapter.lora.alpha`; tensors `blk.N.attn_q.weight.lora_a` \[in, rank\] and `.lora_b`
//! \[rank, out\] in ggml's dimension order), as its `convert_lora_to_gguf.py` writes it, so
//! llama.cpp users can run what edgetune trained. Rows follow llama.cpp's own conversion:
//! q and k permuted for interleaved RoPE in Llama models.

use super::peft::RowOrder;
use super::{AdapterConfig, Method, ParamInfo, Slot, Target};
use crate::error::{Error, Result};
use crate::format::file::{MappedFile, write_atomic};
use crate::format::gguf::Gguf;
use crate::model::config::Origin;
use crate::model::{Arch, Config};
use crate::quant::WeightType;
use std::path::Path;
use std::prelude::v1::*;

const ALIGN: usize = 32;

pub(crate) fn tensor_name(l: u32, t: Target) -> String {
    let base = match t {
        Target::Q => "attn_q",
        Target::K => "attn_k",
        Target::V => "attn_v",
        Target::O => "attn_output",
        Target::Gate => "ffn_gate",
        Target::Up => "ffn_up",
        Target::Down => "ffn_down",
    };
    format!("blk.{l}.{base}.weight")
}

/// The row order llama.cpp's GGUF conversion gives `cfg`'s architecture.
fn llama_cpp_order(cfg: &Config) -> RowOrder {
    match cfg.arch {
        Arch::Llama => RowOrder::Interleaved {
            head_dim: cfg.head_dim,
        },
        _ => RowOrder::HuggingFace,
    }
}

/// The architecture name llama.cpp checks an adapter against: a GGUF model's own
/// (`mistral` loads as a Llama here), else llama.cpp's name for the family.
fn arch_name(cfg: &Config) -> &str {
    match (&cfg.origin, cfg.arch) {
        (Origin::Gguf { arch, .. }, _) => arch,
        (_, Arch::Qwen2) => "qwen2",
        _ => "llama",
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn str(&mut self, s: &str) {
        self.0.extend((s.len() as u64).to_le_bytes());
        self.0.extend(s.as_bytes());
    }
    fn kv_str(&mut self, k: &str, v: &str) {
        self.str(k);
        self.0.extend(8u32.to_le_bytes());
        self.str(v);
    }
    fn kv_f32(&mut self, k: &str, v: f32) {
        self.str(k);
        self.0.extend(6u32.to_le_bytes());
        self.0.extend(v.to_le_bytes());
    }
}

/// Writes a LoRA adapter (layout order, rows in the model's `order`, of a model of `cfg`)
/// as a llama.cpp GGUF adapter, atomically. IA3, norms and full weights have no place in
/// the format.
pub fn save(
    path: &Path,
    adapter: &AdapterConfig,
    layout: &[ParamInfo],
    values: &[Vec<f32>],
    cfg: &Config,
) -> Result<()> {
    let Method::Lora {
        rank,
        alpha,
        rslora,
    } = adapter.method
    else {
        return Err(Error::InvalidArgument {
            name: "adapter",
            reason: format!(
                "llama.cpp's GGUF adapters hold LoRA only, not {}",
                adapter.method_name()
            ),
        });
    };
    // llama.cpp scales by alpha / rank: rsLoRA's alpha / sqrt(rank) is written as the alpha
    // that gives it (rounded once to f32).
    let file_alpha = if rslora {
        (f64::from(alpha) * libm::sqrt(f64::from(rank))) as f32
    } else {
        alpha
    };
    if values.len() != layout.len()
        || layout
            .iter()
            .zip(values)
            .any(|(p, v)| v.len() != p.len() as usize)
    {
        return Err(Error::InvalidArgument {
            name: "adapter values",
            reason: "do not match the layout's tensors and sizes".into(),
        });
    }
    let (model_order, target_order) = (RowOrder::of(cfg), llama_cpp_order(cfg));
    let mut w = Writer(Vec::new());
    w.0.extend(b"GGUF");
    w.0.extend(3u32.to_le_bytes());
    w.0.extend((layout.len() as u64).to_le_bytes());
    w.0.extend(4u64.to_le_bytes());
    w.kv_str("general.architecture", arch_name(cfg));
    w.kv_str("general.type", "adapter");
    w.kv_str("adapter.type", "lora");
    w.kv_f32("adapter.lora.alpha", file_alpha);
    let mut data = Vec::new();
    for (p, v) in layout.iter().zip(values) {
        let (l, t, suffix) = match p.slot {
            Slot::LoraA(l, t) => (l, t, "lora_a"),
            Slot::LoraB(l, t) => (l, t, "lora_b"),
            _ => continue,
        };
        w.str(&format!("{}.{suffix}", tensor_name(l, t)));
        w.0.extend(2u32.to_le_bytes());
        // ggml order: the row length first.
        w.0.extend(u64::from(p.cols).to_le_bytes());
        w.0.extend(u64::from(p.rows).to_le_bytes());
        w.0.extend(0u32.to_le_bytes()); // F32
        w.0.extend((data.len() as u64).to_le_bytes());
        let v = target_order.from_hf(p, &model_order.to_hf(p, v));
        data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        data.resize(data.len().div_ceil(ALIGN) * ALIGN, 0);
    }
    w.0.resize(w.0.len().div_ceil(ALIGN) * ALIGN, 0);
    w.0.extend(data);
    write_atomic(path, &w.0)
}

/// Reads a llama.cpp GGUF LoRA adapter for a model of `cfg` and `dims`: its
/// configuration and its values in the model's layout and row order.
pub fn load(
    path: &Path,
    cfg: &Config,
    dims: &super::Dims,
) -> Result<(AdapterConfig, Vec<Vec<f32>>)> {
    let shown = path.display().to_string();
    let file = MappedFile::open(path)?;
    let bytes = file.bytes();
    let g = Gguf::parse(bytes).map_err(|error| Error::Gguf {
        path: shown.clone(),
        error,
    })?;
    let meta = |key: &str, reason: &str| Error::Metadata {
        file: shown.clone(),
        key: key.into(),
        reason: reason.into(),
    };
    let text = |key: &str| g.get(key).and_then(|v| v.as_str());
    if text("general.type") != Some("adapter") || text("adapter.type") != Some("lora") {
        return Err(meta(
            "general.type",
            "is not a LoRA adapter (general.type = adapter, adapter.type = lora)",
        ));
    }
    if text("general.architecture") != Some(arch_name(cfg)) {
        return Err(meta(
            "general.architecture",
            &format!("is not this model's `{}`", arch_name(cfg)),
        ));
    }
    let alpha = g
        .get("adapter.lora.alpha")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| meta("adapter.lora.alpha", "is missing or not a number"))?
        as f32;
    // Targets and rank from the tensors present in layer 0.
    let targets: Vec<Target> = Target::ALL
        .into_iter()
        .filter(|&t| g.tensor(&format!("{}.lora_a", tensor_name(0, t))).is_some())
        .collect();
    let first = targets
        .first()
        .and_then(|&t| g.tensor(&format!("{}.lora_a", tensor_name(0, t))))
        .ok_or_else(|| meta("tensors", "no lora_a tensor for layer 0"))?;
    let rank = first.dims.get(1).copied().unwrap_or(0);
    let rank = u32::try_from(rank).map_err(|_| meta("tensors", "rank out of range"))?;
    let mut adapter = AdapterConfig {
        method: Method::Lora {
            rank,
            // llama.cpp reads alpha 0 as "scale 1", which alpha = rank gives.
            alpha: if alpha == 0.0 { rank as f32 } else { alpha },
            rslora: false,
        },
        targets,
    };
    adapter.validate()?;
    let layout = super::layout(&adapter, dims);
    let (model_order, file_order) = (RowOrder::of(cfg), llama_cpp_order(cfg));
    let mut values = Vec::with_capacity(layout.len());
    for p in &layout {
        let (l, t, suffix) = match p.slot {
            Slot::LoraA(l, t) => (l, t, "lora_a"),
            Slot::LoraB(l, t) => (l, t, "lora_b"),
            _ => continue,
        };
        let name = format!("{}.{suffix}", tensor_name(l, t));
        let bad = |reason: String| Error::Tensor {
            file: shown.clone(),
            tensor: name.clone(),
            reason,
        };
        let info = g
            .tensor(&name)
            .ok_or_else(|| bad("is missing (layer 0 has this target)".into()))?;
        let wtype = info
            .ggml_type
            .weight_type()
            .filter(|t| matches!(t, WeightType::F32 | WeightType::F16 | WeightType::BF16));
        let Some(wtype) = wtype.filter(|_| info.dims == [u64::from(p.cols), u64::from(p.rows)])
        else {
            return Err(bad(format!(
                "is {} {:?}; the model needs F32, F16 or BF16 [{}, {}]",
                info.ggml_type.name(),
                info.dims,
                p.cols,
                p.rows
            )));
        };
        let data = g
            .tensor_data(bytes, info)
            .ok_or_else(|| bad("lies outside the file".into()))?;
        let mut v = vec![0.0f32; p.len() as usize];
        crate::quant::dequantize(wtype, data, &mut v)?;
        values.push(model_order.from_hf(p, &file_order.to_hf(p, &v)));
    }
    let used = values.len();
    if g.tensors.len() != used {
        return Err(meta(
            "tensors",
            &format!(
                "{} tensors, of which {used} belong to this model's layout",
                g.tensors.len()
            ),
        ));
    }
    Ok((adapter, values))
}

/// Writes the GGUF model `model` to `out` with an adapter merged into its weights, so
/// llama.cpp or any GGUF reader runs the tuned model (`values` in layout order, rows in the
/// model's order, which is the file's); every byte the adapter does not touch is copied:
/// - scales: each targeted block's f16 scale d (a K-quant's super-block d) becomes
///   d * factor;
/// - IA3 on k and v (their output rows): each row's block scales (and Q4_1 / Q4_K
///   minimums) times the row's scale, or for float weights the row's values, and their
///   biases (Qwen2's) element by element;
/// - IA3 on down's input: into up's output rows the same way. down's input is
///   silu(gate x) * (up x), so scaling its element j equals scaling up's row j; down's own
///   columns would sit inside its quantised blocks, which requantising would spoil.
///
/// Scales are rounded to f16 (relative 2^-11; absolute 2^-24 for an f16 subnormal d, which
/// K-quant files often hold); float rows to their own format.
pub fn save_merged_model(
    out: &Path,
    model: &crate::format::file::GgufFile,
    layout: &[ParamInfo],
    values: &[Vec<f32>],
) -> Result<()> {
    use crate::quant;
    let shown = model.path().to_owned();
    let mut bytes = model.bytes().to_vec();
    for (p, v) in layout.iter().zip(values) {
        let (l, t) = match p.slot {
            Slot::Ia3(l, Target::Down) => (l, Target::Up),
            Slot::Scales(l, t) | Slot::Ia3(l, t) => (l, t),
            _ => {
                return Err(Error::InvalidArgument {
                    name: "adapter",
                    reason: format!("`{}` cannot be merged into a GGUF model", p.name),
                });
            }
        };
        let name = tensor_name(l, t);
        // IA3 on down's input is merged into up's rows: say so when up is the problem.
        let why = match p.slot {
            Slot::Ia3(_, Target::Down) => " (where IA3 on down's input is merged)",
            _ => "",
        };
        let bad = |reason: String| Error::Tensor {
            file: shown.clone(),
            tensor: format!("{name}{why}"),
            reason,
        };
        let info = model
            .header
            .tensor(&name)
            .ok_or_else(|| bad("is missing".into()))?;
        let wtype = info
            .ggml_type
            .weight_type()
            .ok_or_else(|| bad(format!("is {}", info.ggml_type.name())))?;
        let [n_in, n_out] = info.dims[..] else {
            return Err(bad(format!("is {:?}, not a matrix", info.dims)));
        };
        let (n_in, n_out) = (n_in as usize, n_out as usize);
        let want = match p.slot {
            Slot::Scales(..) => n_out * (n_in / wtype.block_elems()),
            _ => n_out,
        };
        if v.len() != want || p.len() as usize != want {
            return Err(bad(format!(
                "is {:?}; the adapter's `{}` holds {} values",
                info.dims,
                p.name,
                v.len()
            )));
        }
        let rb = wtype.row_bytes(n_in)?;
        let start =
            usize::try_from(info.offset).map_err(|_| bad("lies outside the file".into()))?;
        let data = rb
            .checked_mul(n_out)
            .and_then(|n| start.checked_add(n))
            .and_then(|end| bytes.get_mut(start..end))
            .ok_or_else(|| bad("lies outside the file".into()))?;
        let bb = wtype.block_bytes();
        match p.slot {
            Slot::Scales(..) => {
                if !quant::has_block_scale(wtype) {
                    return Err(bad(format!(
                        "is {}, which has no f16 block scales",
                        wtype.name()
                    )));
                }
                for (i, (blk, &f)) in data.chunks_exact_mut(bb).zip(v).enumerate() {
                    scale_block_bytes(wtype, blk, f, false)
                        .map_err(|e| bad(format!("block {i}: {e}")))?;
                }
            }
            _ => {
                for (r, (row, &s)) in data.chunks_exact_mut(rb).zip(v).enumerate() {
                    if quant::has_block_scale(wtype) {
                        for blk in row.chunks_exact_mut(bb) {
                            scale_block_bytes(wtype, blk, s, true)
                                .map_err(|e| bad(format!("row {r}: {e}")))?;
                        }
                    } else {
                        scale_floats(wtype, row, |_| s)
                            .map_err(|e| bad(format!("row {r}: {e}")))?;
                    }
                }
            }
        }
        // IA3 scales k's and v's outputs after their bias (Qwen2's): s (W x + b).
        let bias = name.replace(".weight", ".bias");
        if let (Slot::Ia3(_, Target::K | Target::V), Some(b)) = (p.slot, model.header.tensor(&bias))
        {
            let bad = |reason: String| Error::Tensor {
                file: shown.clone(),
                tensor: bias.clone(),
                reason,
            };
            let btype = b
                .ggml_type
                .weight_type()
                .filter(|t| t.block_elems() == 1 && b.dims[..] == [n_out as u64])
                .ok_or_else(|| bad(format!("is {} {:?}", b.ggml_type.name(), b.dims)))?;
            let data = usize::try_from(b.offset)
                .ok()
                .and_then(|start| Some(start..start.checked_add(btype.row_bytes(n_out).ok()?)?))
                .and_then(|range| bytes.get_mut(range))
                .ok_or_else(|| bad("lies outside the file".into()))?;
            scale_floats(btype, data, |i| v[i]).map_err(bad)?;
        }
    }
    write_atomic(out, &bytes)
}

/// Float values (f32, f16 or bf16) in `data`, value i times `scale(i)`, written back in
/// their own format.
fn scale_floats(
    wtype: WeightType,
    data: &mut [u8],
    scale: impl Fn(usize) -> f32,
) -> core::result::Result<(), String> {
    let mut x = vec![0.0f32; data.len() / wtype.block_bytes()];
    crate::quant::dequantize(wtype, data, &mut x).map_err(|e| e.to_string())?;
    for (i, v) in x.iter_mut().enumerate() {
        *v *= scale(i);
        if !v.is_finite() {
            return Err(format!("merged value {i} is not finite"));
        }
    }
    data.copy_from_slice(&crate::quant::quantize(wtype, &x).map_err(|e| e.to_string())?);
    Ok(())
}

/// A block's f16 scale d times `f`; with `whole`, its minimum too (Q4_1's m, Q4_K's dmin,
/// stored after d), so that every value of the block is scaled.
fn scale_block_bytes(
    wtype: WeightType,
    blk: &mut [u8],
    f: f32,
    whole: bool,
) -> core::result::Result<(), String> {
    let d = crate::quant::block_scale_offset(wtype);
    let with_min = whole && matches!(wtype, WeightType::Q4_1 | WeightType::Q4K);
    for off in [d, d + 2].into_iter().take(if with_min { 2 } else { 1 }) {
        let v = crate::quant::f16_at(blk, off) * f;
        let h = half::f16::from_f32(v);
        if !h.is_finite() {
            return Err(format!("{v:e} (factor {f:e}) does not fit an f16"));
        }
        blk[off..off + 2].copy_from_slice(&h.to_bits().to_le_bytes());
    }
    Ok(())
}
