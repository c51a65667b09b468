//! Merging a LoRA or IA3 adapter into an unquantised Hugging Face model: the projections
//! an adapter touches are rewritten in f32 (W + scale B A; IA3's output scales on the rows
//! of W and its bias, its input scales on W's columns), every other tensor is copied in its
//! stored type, and the directory's JSON files (config, tokenizer) come along, so
//! transformers or edgetune load the result as a plain model.

use super::{AdapterConfig, Method, ParamInfo, Slot, Target};
use crate::error::{Error, Result};
use crate::format::file::write_atomic;
use crate::model::files::HfDir;
use crate::model::llama::{HostTensor, Role, TensorSource};
use crate::quant::{self, WeightType};
use std::collections::HashMap;
use std::path::Path;
use std::prelude::v1::*;

/// Every role a Llama-family model may hold, in file order.
fn roles(layers: u32) -> Vec<Role> {
    let mut out = vec![Role::Embed];
    for l in 0..layers {
        out.extend([
            Role::AttnNorm(l),
            Role::Q(l),
            Role::QBias(l),
            Role::K(l),
            Role::KBias(l),
            Role::V(l),
            Role::VBias(l),
            Role::O(l),
            Role::FfnNorm(l),
            Role::Gate(l),
            Role::Up(l),
            Role::Down(l),
        ]);
    }
    out.extend([Role::OutputNorm, Role::Output]);
    out
}

fn projection(role: Role) -> Option<(u32, Target, bool)> {
    Some(match role {
        Role::Q(l) => (l, Target::Q, false),
        Role::K(l) => (l, Target::K, false),
        Role::V(l) => (l, Target::V, false),
        Role::O(l) => (l, Target::O, false),
        Role::Gate(l) => (l, Target::Gate, false),
        Role::Up(l) => (l, Target::Up, false),
        Role::Down(l) => (l, Target::Down, false),
        Role::QBias(l) => (l, Target::Q, true),
        Role::KBias(l) => (l, Target::K, true),
        Role::VBias(l) => (l, Target::V, true),
        _ => return None,
    })
}

fn f32s(t: &HostTensor<'_>) -> Result<Vec<f32>> {
    let mut v = vec![0.0f32; (t.rows * t.cols) as usize];
    quant::dequantize(t.wtype, &t.data, &mut v)?;
    Ok(v)
}

/// Writes `model` with the adapter (`cfg`, its `layout` and `values` in Hugging Face row
/// order) merged into `out` (a directory, created if needed): model.safetensors and the
/// source's JSON files except a shard index.
pub fn merge_into_safetensors(
    model: &HfDir,
    cfg: &AdapterConfig,
    layout: &[ParamInfo],
    values: &[Vec<f32>],
    out: &Path,
) -> Result<()> {
    let scale = match cfg.method {
        Method::Lora { .. } => cfg.lora_scale(),
        Method::Ia3 => 1.0,
        _ => {
            return Err(Error::InvalidArgument {
                name: "adapter",
                reason: format!(
                    "merge takes lora or ia3 adapters, not {}",
                    cfg.method_name()
                ),
            });
        }
    };
    let by_slot: HashMap<Slot, &Vec<f32>> = layout.iter().map(|p| p.slot).zip(values).collect();
    let src_dir = model.dir();
    // Writing into the model's own directory would put a second model.safetensors beside
    // its shards (or over its file).
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if same(out, src_dir) {
        return Err(Error::InvalidArgument {
            name: "out",
            reason: format!("{} is the model's own directory", out.display()),
        });
    }
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for role in roles(model.layers()) {
        let Some(t) = model.tensor(role)? else {
            continue;
        };
        let shape = if t.rows == 1 && !matches!(role, Role::Embed | Role::Output) {
            vec![t.cols as usize]
        } else {
            vec![t.rows as usize, t.cols as usize]
        };
        let (rows, cols) = (t.rows as usize, t.cols as usize);
        let merged = match projection(role) {
            Some((l, target, is_bias)) => {
                let a = by_slot.get(&Slot::LoraA(l, target));
                let b = by_slot.get(&Slot::LoraB(l, target));
                let s = by_slot.get(&Slot::Ia3(l, target));
                match (a, b, s, is_bias) {
                    (Some(a), Some(b), _, false) => {
                        let mut w = f32s(&t)?;
                        let rank = a.len() / cols.max(1);
                        if a.len() != rank * cols || b.len() != rows * rank {
                            return Err(Error::Tensor {
                                file: t.file.clone(),
                                tensor: t.name.clone(),
                                reason: format!(
                                    "LoRA A holds {} and B {} values; [{rows}, {cols}] needs rank x {cols} and {rows} x rank",
                                    a.len(),
                                    b.len()
                                ),
                            });
                        }
                        for r in 0..rows {
                            for k in 0..rank {
                                let f = scale * b[r * rank + k];
                                for (wv, av) in w[r * cols..(r + 1) * cols]
                                    .iter_mut()
                                    .zip(&a[k * cols..(k + 1) * cols])
                                {
                                    *wv += f * av;
                                }
                            }
                        }
                        Some(w)
                    }
                    // IA3 on an input (down): columns; on an output (k, v): rows and bias.
                    (_, _, Some(s), false) if target == Target::Down && s.len() != cols => {
                        return Err(Error::Tensor {
                            file: t.file.clone(),
                            tensor: t.name.clone(),
                            reason: format!("IA3 holds {} scales for {cols} columns", s.len()),
                        });
                    }
                    (_, _, Some(s), false) if target == Target::Down => {
                        let mut w = f32s(&t)?;
                        for row in w.chunks_exact_mut(cols) {
                            for (x, f) in row.iter_mut().zip(s.iter()) {
                                *x *= f;
                            }
                        }
                        Some(w)
                    }
                    (_, _, Some(s), _) if target != Target::Down => {
                        let mut w = f32s(&t)?;
                        // A bias is one row: its elements are the output features.
                        let width = if is_bias { 1 } else { cols };
                        for (row, f) in w.chunks_exact_mut(width).zip(s.iter()) {
                            row.iter_mut().for_each(|x| *x *= f);
                        }
                        Some(w)
                    }
                    _ => None,
                }
            }
            None => None,
        };
        let (dtype, bytes) = match merged {
            Some(w) => (
                safetensors::Dtype::F32,
                w.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            None => (
                match t.wtype {
                    WeightType::F16 => safetensors::Dtype::F16,
                    WeightType::BF16 => safetensors::Dtype::BF16,
                    _ => safetensors::Dtype::F32,
                },
                match t.wtype {
                    WeightType::F16 | WeightType::BF16 | WeightType::F32 => t.data.to_vec(),
                    _ => f32s(&t)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
            ),
        };
        tensors.push((t.name.clone(), dtype, shape, bytes));
    }
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Tensor {
                    file: "merged model".into(),
                    tensor: name.clone(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| Error::Tensor {
        file: "merged model".into(),
        tensor: String::new(),
        reason: e.to_string(),
    })?;
    let io = |p: &Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    write_atomic(&out.join("model.safetensors"), &bytes)?;
    for entry in std::fs::read_dir(src_dir).map_err(|e| io(src_dir, e))? {
        let path = entry.map_err(|e| io(src_dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".json") && name != "model.safetensors.index.json" && path.is_file() {
            let data = std::fs::read(&path).map_err(|e| io(&path, e))?;
            write_atomic(&out.join(name), &data)?;
        }
    }
    Ok(())
}
