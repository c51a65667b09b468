//! Kernel shapes chosen per device by measurement. The quantised matrix-vector product and
//! decode-step attention have shapes (invocations per workgroup, rows per invocation) whose
//! best value differs between devices by several times (register counts, cores, how an
//! emulated GPU maps workgroups to threads), and prompt attention and prompt products have
//! subgroup variants ([`Variant`]) that only some devices run well. On first use of an adapter and driver,
//! `autotune` times each candidate on the shapes of a small model and keeps the fastest;
//! the choice is cached on disk, keyed by adapter, driver, edgetune version, kernels and
//! candidates (and, for llvmpipe, the host's vector instructions, CPUs and Mesa's code
//! generation variables, which change its fastest shapes), and a cache
//! that is unreadable, stale or names a shape outside the candidates is ignored and
//! rebuilt. Candidates differ only in how the terms of each sum are grouped (rounding),
//! never in what is summed; `tests/tests/tune.rs` checks every one against the reference.

use super::host::Isa;
use super::wgpu::{Gpu, GpuBuffer, SHADERS};
use super::{Backend, Op, RopeScaling, RopeStyle, rope_table};
use crate::error::{Error, Result};
use crate::format::file::{FileKind, read_json};
use crate::quant::WeightType;
use std::path::{Path, PathBuf};
use std::prelude::v1::*;
use std::time::Instant;

/// The shape of one matrix-vector dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatvecShape {
    /// Invocations per workgroup.
    pub wg: u32,
    /// Weight rows per invocation (4 or 8), or per workgroup when `split`.
    pub rows: u32,
    /// `qmatvec_split`: a workgroup's invocations split each row's k and add their sums
    /// in workgroup memory (written `WGxROWSs`); else `qmatvec`, one invocation per rows.
    pub split: bool,
    /// `qmatvec_sg8` (quant_sg.wgsl) for the 32-element block formats: one invocation per
    /// `rows` adjacent rows (one row in the last, partial row group where the row count
    /// is not a multiple of `rows`), x shared
    /// across subgroups of 8 (written `WGxROWSg`); devices without such subgroups, and
    /// other formats, run `qmatvec` with the same shape.
    pub subgroup: bool,
    /// With `subgroup`, the weights are read from a texture holding the same bytes
    /// (written `WGxROWSgt`), made on a weight's first such product: each weight then
    /// takes its memory twice, so measuring keeps it only where it is clearly faster.
    pub texture: bool,
}

impl MatvecShape {
    pub fn spec(&self) -> String {
        format!(
            "{}x{}{}",
            self.wg,
            self.rows,
            if self.split {
                "s"
            } else if self.texture {
                "gt"
            } else if self.subgroup {
                "g"
            } else {
                ""
            }
        )
    }
}

/// The shapes the wgpu backend dispatches with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelShapes {
    /// Matrix-vector products with fewer than [`WIDE_FROM`] output rows (projections).
    pub matvec: MatvecShape,
    /// Those with at least [`WIDE_FROM`] (output heads).
    pub matvec_wide: MatvecShape,
    /// Attention with few (token, head) pairs: a decode step.
    pub attention_decode: AttentionShape,
    /// Attention with many: a prompt or a training pass (`attention_v4`, `attention_sg8`,
    /// or `attention_dsg8` over texture copies of the keys and values).
    pub attention_prefill: Variant,
    /// Products of a quantised weight with many rows of x (Q8_0, Q4_0, Q4_1): dequantise
    /// to f32 and `matmul8`, or `qmatmul_sg8` on the blocks.
    pub prompt_matmul: Variant,
}

/// A kernel with a variant for devices whose subgroups are exactly 8 invocations (lavapipe
/// on AVX2 and AVX-512 hosts; the `*_sg.wgsl` files). On a CPU-emulated GPU the 8
/// invocations of a subgroup are the lanes of one vector register and a load whose
/// address differs per lane is a loop over the lanes, so these variants load each value
/// once per subgroup and share it with `subgroupBroadcast`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The kernel every device runs (written `portable`).
    Portable,
    /// The subgroup variant (written `sg8`); a device without subgroups of 8 runs the
    /// portable kernel instead.
    Subgroup8,
    /// A subgroup variant reading from textures (written `sg8t`): for the prompt products
    /// their weights, as `MatvecShape::texture`; for prompt attention the decode kernel
    /// `attention_dsg8`, one pass per (token, kv head) over texture copies of the keys and
    /// values (lavapipe without AVX-512 loads buffers lane by lane; `attention_sg8` also
    /// holds whole head rows per invocation, which spill with 16 vector registers).
    Subgroup8Texture,
}

impl Variant {
    pub fn spec(&self) -> &'static str {
        match self {
            Variant::Portable => "portable",
            Variant::Subgroup8 => "sg8",
            Variant::Subgroup8Texture => "sg8t",
        }
    }
}

const VARIANTS: [Variant; 3] = [
    Variant::Portable,
    Variant::Subgroup8,
    Variant::Subgroup8Texture,
];

/// The shape of decode-step attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Invocations per workgroup; with `subgroup`, positions per workgroup (of 8
    /// invocations).
    pub wg: u32,
    /// `attention_split`: a workgroup per (token, head), its invocations splitting the
    /// positions (written `WGs`); else `attention_v4`, one invocation per pair.
    pub split: bool,
    /// With `split`, `attention_gqa`: the workgroup serves every query head of one kv
    /// head, loading each key and value once for all of them (written `WGq`). Models with
    /// more than 4 query heads per kv head run `attention_split` instead.
    pub gqa: bool,
    /// `attention_dsg8` and `attention_merge` (shaders/attention_sg.wgsl): workgroups of
    /// one 8-invocation subgroup, each taking `wg` positions of one kv head for all its
    /// query heads, merged by a second dispatch (written `WGd`). A device without
    /// subgroups of 8, or a model outside the kernel's head sizes (head_dim a multiple of
    /// 32 up to 128, at most 4 query heads per kv head), runs the portable kernels.
    pub subgroup: bool,
    /// With `subgroup`, the keys and values are read from textures kept in step with the
    /// cache (written `WGdt`) after a call's first position; the cache is then held twice.
    pub texture: bool,
    /// With `subgroup`, a context of up to this many positions runs in one workgroup per
    /// (token, kv head), written straight into the output: no merge dispatch, less
    /// parallelism (written `WGd[t]/N`); 0: always chunks of `wg`.
    pub one_pass: u32,
}

impl AttentionShape {
    /// `attention_v4` with `wg` invocations per workgroup: the shape the others vary.
    pub const fn v4(wg: u32) -> AttentionShape {
        AttentionShape {
            wg,
            split: false,
            gqa: false,
            subgroup: false,
            texture: false,
            one_pass: 0,
        }
    }

    pub fn spec(&self) -> String {
        let suffix = match (self.split, self.gqa, self.subgroup, self.texture) {
            (true, true, ..) => "q",
            (true, false, ..) => "s",
            (_, _, true, true) => "dt",
            (_, _, true, false) => "d",
            _ => "",
        };
        match self.one_pass {
            0 => format!("{}{suffix}", self.wg),
            n => format!("{}{suffix}/{n}", self.wg),
        }
    }
}

/// Output rows from which a product counts as wide.
pub const WIDE_FROM: u32 = 16_384;
/// (token, head) pairs below which attention counts as a decode step.
pub const DECODE_PAIRS_BELOW: u32 = 256;

const MATVEC_WG: [u32; 4] = [8, 16, 32, 64];
const MATVEC_ROWS: [u32; 2] = [4, 8];
const ATTENTION_WG: [u32; 3] = [4, 16, 64];
const ATTENTION_SPLIT: [u32; 2] = [8, 16];
/// Positions per workgroup of `attention_dsg8`.
const ATTENTION_CHUNK: [u32; 2] = [32, 64];
/// Contexts `attention_dsg8` may take in one pass, longest first.
const ONE_PASS: [u32; 4] = [1024, 768, 512, 256];

fn attention_candidates() -> Vec<AttentionShape> {
    let one = ATTENTION_WG.map(AttentionShape::v4);
    let split = [false, true].into_iter().flat_map(|gqa| {
        ATTENTION_SPLIT.map(|wg| AttentionShape {
            split: true,
            gqa,
            ..AttentionShape::v4(wg)
        })
    });
    let subgroup = [false, true].into_iter().flat_map(|texture| {
        ATTENTION_CHUNK.map(|wg| AttentionShape {
            subgroup: true,
            texture,
            ..AttentionShape::v4(wg)
        })
    });
    one.into_iter().chain(split).chain(subgroup).collect()
}

impl Default for KernelShapes {
    /// Portable kernels in shapes that ran well on lavapipe before the subgroup variants
    /// (BENCHMARKS.md), used without measurement.
    fn default() -> Self {
        KernelShapes {
            matvec: MatvecShape {
                wg: 16,
                rows: 4,
                split: false,
                subgroup: false,
                texture: false,
            },
            matvec_wide: MatvecShape {
                wg: 16,
                rows: 8,
                split: false,
                subgroup: false,
                texture: false,
            },
            attention_decode: AttentionShape::v4(4),
            attention_prefill: Variant::Portable,
            prompt_matmul: Variant::Portable,
        }
    }
}

impl KernelShapes {
    /// `matvec=WGxROWS,matvec_wide=WGxROWS,attention_decode=WG,attention_prefill=V,
    /// prompt_matmul=V` (V: portable or sg8), as `--kernel-shapes` takes and `selftest`
    /// shows it.
    pub fn spec(&self) -> String {
        format!(
            "matvec={},matvec_wide={},attention_decode={},attention_prefill={},prompt_matmul={}",
            self.matvec.spec(),
            self.matvec_wide.spec(),
            self.attention_decode.spec(),
            self.attention_prefill.spec(),
            self.prompt_matmul.spec()
        )
    }

    /// A notice naming what these shapes hold a second time, as textures, on a device
    /// with subgroups of 8.
    fn held_twice(&self) -> Option<String> {
        let weights = self.matvec.texture
            || self.matvec_wide.texture
            || self.prompt_matmul == Variant::Subgroup8Texture;
        let cache =
            self.attention_decode.texture || self.attention_prefill == Variant::Subgroup8Texture;
        let what = match (weights, cache) {
            (true, true) => "the quantised weights and the KV cache",
            (true, false) => "the quantised weights",
            (false, true) => "the KV cache",
            (false, false) => return None,
        };
        Some(format!(
            "these kernel shapes hold {what} a second time, as textures, for speed; \
             shapes without the texture forms (gt, dt, sg8t) hold them once"
        ))
    }

    /// The choices that need subgroups of 8, by key.
    fn subgroup_choices(&self) -> Vec<&'static str> {
        [
            ("attention_prefill", self.attention_prefill),
            ("prompt_matmul", self.prompt_matmul),
        ]
        .into_iter()
        .filter(|(_, v)| *v != Variant::Portable)
        .map(|(k, _)| k)
        .chain(self.attention_decode.subgroup.then_some("attention_decode"))
        .chain(
            [("matvec", self.matvec), ("matvec_wide", self.matvec_wide)]
                .into_iter()
                .filter(|(_, m)| m.subgroup)
                .map(|(k, _)| k),
        )
        .collect()
    }

    /// Parses [`KernelShapes::spec`]'s form; keys left out keep their default. Only
    /// candidate values are accepted, so a forced shape is one the tests cover.
    pub fn parse(spec: &str) -> Result<KernelShapes> {
        let bad = |reason: String| Error::InvalidArgument {
            name: "kernel shapes",
            reason,
        };
        let mut s = KernelShapes::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not KEY=VALUE")))?;
            let num = |v: &str, allowed: &[u32]| {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| allowed.contains(n))
                    .ok_or_else(|| bad(format!("{key}: {v:?} is not one of {allowed:?}")))
            };
            let matvec = |v: &str| -> Result<MatvecShape> {
                let (wg, rows) = v.split_once('x').ok_or_else(|| {
                    bad(format!(
                        "{key}: {v:?} is not WGxROWS[s|g|gt], e.g. 16x4, 32x4s, 32x8g or 8x8gt"
                    ))
                })?;
                let (rows, split, subgroup, texture) = if let Some(r) = rows.strip_suffix("gt") {
                    (r, false, true, true)
                } else if let Some(r) = rows.strip_suffix('s') {
                    (r, true, false, false)
                } else if let Some(r) = rows.strip_suffix('g') {
                    (r, false, true, false)
                } else {
                    (rows, false, false, false)
                };
                Ok(MatvecShape {
                    wg: num(wg, &MATVEC_WG)?,
                    rows: num(rows, &MATVEC_ROWS)?,
                    split,
                    subgroup,
                    texture,
                })
            };
            match key {
                "matvec" => s.matvec = matvec(value)?,
                "matvec_wide" => s.matvec_wide = matvec(value)?,
                "attention_decode" => {
                    let (value, one_pass) = match value.split_once('/') {
                        Some((v, n)) => (v, num(n, &ONE_PASS)?),
                        None => (value, 0),
                    };
                    let gqa = value.strip_suffix('q');
                    let texture = value.strip_suffix("dt");
                    s.attention_decode = if let Some(wg) = gqa.or_else(|| value.strip_suffix('s')) {
                        AttentionShape {
                            split: true,
                            gqa: gqa.is_some(),
                            ..AttentionShape::v4(num(wg, &ATTENTION_SPLIT)?)
                        }
                    } else if let Some(wg) = texture.or_else(|| value.strip_suffix('d')) {
                        AttentionShape {
                            subgroup: true,
                            texture: texture.is_some(),
                            one_pass,
                            ..AttentionShape::v4(num(wg, &ATTENTION_CHUNK)?)
                        }
                    } else {
                        AttentionShape::v4(num(value, &ATTENTION_WG)?)
                    };
                    if one_pass > 0 && !s.attention_decode.subgroup {
                        return Err(bad(format!(
                            "{key}={value}/{one_pass}: one pass is for the subgroup form (d, dt)"
                        )));
                    }
                }
                "attention_prefill" | "prompt_matmul" => {
                    let v = VARIANTS
                        .iter()
                        .copied()
                        .find(|c| c.spec() == value)
                        .ok_or_else(|| {
                            let names: Vec<_> = VARIANTS.iter().map(Variant::spec).collect();
                            bad(format!(
                                "{key}: {value:?} is not one of {}",
                                names.join(", ")
                            ))
                        })?;
                    if key == "prompt_matmul" {
                        s.prompt_matmul = v;
                    } else {
                        s.attention_prefill = v;
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key {key:?} (matvec, matvec_wide, attention_decode, \
                         attention_prefill, prompt_matmul)"
                    )));
                }
            }
        }
        Ok(s)
    }

    /// Shapes that hold every candidate of each kind: each matrix-vector form once, the
    /// attention forms in turn beside them (what the tests run on a device), the subgroup
    /// form's second turn in one pass up to the shortest context it may take.
    pub fn covering() -> Vec<KernelShapes> {
        let attention = attention_candidates();
        let shortest = ONE_PASS[ONE_PASS.len() - 1];
        matvec_candidates()
            .into_iter()
            .enumerate()
            .map(|(i, m)| KernelShapes {
                matvec: m,
                matvec_wide: m,
                attention_decode: match attention[i % attention.len()] {
                    a if a.subgroup && (i / attention.len()) % 2 == 1 => AttentionShape {
                        one_pass: shortest,
                        ..a
                    },
                    a => a,
                },
                attention_prefill: VARIANTS[i % VARIANTS.len()],
                prompt_matmul: VARIANTS[(i / 2) % VARIANTS.len()],
            })
            .collect()
    }
}

fn matvec_candidates() -> Vec<MatvecShape> {
    let mut v = Vec::new();
    for (split, subgroup, texture) in [
        (false, false, false),
        (true, false, false),
        (false, true, false),
        (false, true, true),
    ] {
        for wg in MATVEC_WG {
            for rows in MATVEC_ROWS {
                v.push(MatvecShape {
                    wg,
                    rows,
                    split,
                    subgroup,
                    texture,
                });
            }
        }
    }
    v
}

/// How to choose the shapes when a device is opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Tuning {
    /// The cached choice for this adapter and driver, measured and cached if there is none
    /// (or it is unreadable or stale).
    #[default]
    Cached,
    /// Measure again and replace the cache.
    Measure,
    /// The built-in defaults, without measuring or touching the cache.
    Defaults,
    /// These shapes.
    Force(KernelShapes),
}

/// The shapes a device runs with and where they came from, for `selftest` and `bench`.
#[derive(Debug, Clone)]
pub struct TuneReport {
    pub shapes: KernelShapes,
    /// "measured now (…ms), cached in PATH", "cached in PATH", "defaults", "forced".
    pub origin: String,
    /// Notices: on llvmpipe its threads and what it runs slowly; a cache that was ignored
    /// and why, or could not be written; forced shapes the device cannot run.
    pub notes: Vec<String>,
}

/// Where a cache for this adapter lives: under `dir` if given, else `$EDGETUNE_CACHE_DIR`,
/// `$XDG_CACHE_HOME/edgetune` or `$HOME/.cache/edgetune`; `None` without any of them.
fn cache_path(identity: &str, dir: Option<&Path>) -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = dir
        .map(Path::to_path_buf)
        .or_else(|| env("EDGETUNE_CACHE_DIR"))
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("edgetune")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("edgetune")))?;
    let hash = fnv1a(identity.bytes());
    Some(dir.join("autotune").join(format!("{hash:016x}.json")))
}

/// FNV-1a: a hash stable across Rust versions (file names; the identity is checked inside).
fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The cached shapes, or why the cache cannot be trusted.
fn load(path: &Path, identity: &str) -> core::result::Result<KernelShapes, String> {
    let v = read_json(path, FileKind::TuneCache).map_err(|e| e.to_string())?;
    if v["identity"].as_str() != Some(identity) {
        return Err(
            "it was made for another adapter, driver, edgetune version or set of candidates".into(),
        );
    }
    let spec = v["shapes"].as_str().ok_or("it holds no shapes")?;
    let shapes = KernelShapes::parse(spec).map_err(|e| e.to_string())?;
    // A cache written before a choice existed leaves it at its default, unmeasured.
    if shapes.spec() != spec {
        return Err("it does not name every kernel choice".into());
    }
    Ok(shapes)
}

/// Writes atomically (a temporary file renamed into place), so concurrent processes
/// never read half a cache.
fn save(path: &Path, identity: &str, shapes: &KernelShapes, timings: &[String]) -> Result<()> {
    let body = serde_json::json!({
        "identity": identity,
        "shapes": shapes.spec(),
        "timings_us": timings,
    });
    crate::format::file::write_atomic(path, body.to_string().as_bytes())
}

/// Seconds per call of `ops` (run one after another) on `gpu` with `shapes`: the fastest
/// of five batches after a warm-up (which compiles the pipelines), since other work on the
/// machine only ever adds time; or one call's time if that is over three times `best`.
/// A batch is up to four calls, as many as take about [`BATCH_SECONDS`] (against which
/// the sync that ends it is small).
fn time_op(
    gpu: &mut Gpu,
    shapes: KernelShapes,
    ops: &[Op<'_, GpuBuffer>],
    best: f64,
) -> Result<f64> {
    gpu.set_shapes(shapes);
    let run = |gpu: &Gpu| ops.iter().try_for_each(|op| gpu.run(op));
    run(gpu)?;
    gpu.sync()?;
    // A candidate several times slower than the best so far is not timed further.
    let start = Instant::now();
    run(gpu)?;
    gpu.sync()?;
    let once = start.elapsed().as_secs_f64();
    if once > 3.0 * best {
        return Ok(once);
    }
    let calls = (BATCH_SECONDS / once).ceil().clamp(1.0, 4.0) as u32;
    let mut t = Vec::with_capacity(5);
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..calls {
            run(gpu)?;
        }
        gpu.sync()?;
        t.push(start.elapsed().as_secs_f64() / f64::from(calls));
    }
    Ok(t.into_iter().fold(f64::INFINITY, f64::min))
}

/// What a timing batch should take at least, within four calls.
const BATCH_SECONDS: f64 = 2e-3;

/// SmolLM2-135M's width and feed-forward width.
const DIM: u32 = 576;
const FFN: u32 = 1536;

/// SmolLM2-135M's query heads, kv heads and head size.
const ATTENTION_HEADS: (u32, u32, u32) = (9, 3, 64);

/// Layers of a decode step timed together, each with its own weights and cache: one
/// layer's stay in the CPU's L2 from one run to the next, a model's do not, and on
/// lavapipe reading them from buffers rather than textures costs far more from L3
/// (BENCHMARKS.md, seventeenth part). Eight of SmolLM2's Q4_1 layers are 18 MiB, their
/// caches at 512 positions 12 MiB with their textures.
const DECODE_LAYERS: usize = 8;

/// [`DECODE_LAYERS`] layers' decode step at position `pos0`.
fn decode_attention(gpu: &Gpu, pos0: u32) -> Result<Vec<AttentionStep>> {
    (0..DECODE_LAYERS)
        .map(|_| AttentionStep::new(gpu, pos0, 1))
        .collect()
}

/// Every layer's ops in turn.
fn layer_ops(layers: &[AttentionStep]) -> Vec<Op<'_, GpuBuffer>> {
    layers.iter().flat_map(AttentionStep::ops).collect()
}

/// The attention of `tokens` tokens at positions `pos0 ..` of [`ATTENTION_HEADS`], with
/// the RoPE and cache write before it: a decode step (one token) or a prompt.
struct AttentionStep {
    step: GpuBuffer,
    q: GpuBuffer,
    new_kv: GpuBuffer,
    table: GpuBuffer,
    k: GpuBuffer,
    v: GpuBuffer,
    out: GpuBuffer,
    pos0: u32,
    tokens: u32,
}

impl AttentionStep {
    fn new(gpu: &Gpu, pos0: u32, tokens: u32) -> Result<AttentionStep> {
        let (heads, kv_heads, hd) = ATTENTION_HEADS;
        let rows = pos0 + tokens;
        let kv = vec![0.1; (rows * kv_heads * hd) as usize];
        let q_bytes = u64::from(tokens * heads * hd) * 4;
        Ok(AttentionStep {
            step: gpu.upload_f32(&vec![0.1; (tokens * heads * hd) as usize], "tune q")?,
            q: gpu.alloc(q_bytes, "tune q")?,
            new_kv: gpu.upload_f32(&vec![0.1; (tokens * kv_heads * hd) as usize], "tune kv")?,
            table: gpu.upload_f32(
                &rope_table(10000.0, hd, rows, &RopeScaling::None),
                "tune rope",
            )?,
            k: gpu.upload_f32(&kv, "tune k")?,
            v: gpu.upload_f32(&kv, "tune v")?,
            out: gpu.alloc(q_bytes, "tune out")?,
            pos0,
            tokens,
        })
    }

    fn ops(&self) -> [Op<'_, GpuBuffer>; 2] {
        let (n_heads, n_kv_heads, head_dim) = ATTENTION_HEADS;
        [
            Op::RopeKv {
                q: &self.step,
                k: &self.new_kv,
                v: &self.new_kv,
                table: &self.table,
                q_out: &self.q,
                k_cache: &self.k,
                v_cache: &self.v,
                n_tokens: self.tokens,
                n_heads,
                n_kv_heads,
                head_dim,
                pos0: self.pos0,
                style: RopeStyle::HalfSplit,
            },
            Op::Attention {
                q: &self.q,
                k: &self.k,
                v: &self.v,
                out: &self.out,
                n_tokens: self.tokens,
                n_heads,
                n_kv_heads,
                head_dim,
                pos0: self.pos0,
                row0: 0,
                scale: 0.125,
            },
        ]
    }
}

/// The buffers a decode step's layers share, as in a model: the residual stream (`x`,
/// `x2`), a product's output (`h`), the unused q/k/v outputs of the fused step, the
/// SwiGLU activation and a norm weight.
struct LayerIo {
    x: GpuBuffer,
    x2: GpuBuffer,
    h: GpuBuffer,
    q: GpuBuffer,
    k: GpuBuffer,
    v: GpuBuffer,
    act: GpuBuffer,
    norm: GpuBuffer,
}

impl LayerIo {
    fn new(gpu: &Gpu) -> Result<LayerIo> {
        let (heads, kv_heads, hd) = ATTENTION_HEADS;
        let f32s = |n: u32, what| gpu.upload_f32(&vec![0.1; n as usize], what);
        Ok(LayerIo {
            x: f32s(DIM, "tune x")?,
            x2: f32s(DIM, "tune x")?,
            h: f32s(DIM, "tune h")?,
            q: gpu.alloc(u64::from(heads * hd) * 4, "tune q")?,
            k: gpu.alloc(u64::from(kv_heads * hd) * 4, "tune k")?,
            v: gpu.alloc(u64::from(kv_heads * hd) * 4, "tune v")?,
            act: gpu.alloc(u64::from(FFN) * 4, "tune act")?,
            norm: f32s(DIM, "tune norm")?,
        })
    }
}

/// One layer of a GGUF model's decode step at position 511 with its own weights and
/// cache, run as the model runs it: the pending residual add and norm with the q, k and
/// v products, RoPE and cache write; the output product; the add and norm with the gate
/// and up products and SwiGLU; the down product. The products' forms are timed on this
/// (fused kernels read several weights per dispatch and are what a model runs; a
/// product timed alone misjudged reading weights from textures, BENCHMARKS.md); its
/// attention, which has its own choice, is left out.
struct DecodeLayer {
    attention: AttentionStep,
    /// q, k, v, o, gate, up, down.
    w: [GpuBuffer; 7],
}

impl DecodeLayer {
    fn new(gpu: &Gpu) -> Result<DecodeLayer> {
        let (heads, kv_heads, hd) = ATTENTION_HEADS;
        let (q, kv) = (heads * hd, kv_heads * hd);
        let w = |k, n| synthetic_weights(gpu, TUNE_WTYPE, k, n);
        Ok(DecodeLayer {
            attention: AttentionStep::new(gpu, 511, 1)?,
            w: [
                w(DIM, q)?,
                w(DIM, kv)?,
                w(DIM, kv)?,
                w(q, DIM)?,
                w(DIM, FFN)?,
                w(DIM, FFN)?,
                w(FFN, DIM)?,
            ],
        })
    }

    fn ops<'a>(&'a self, io: &'a LayerIo) -> [Op<'a, GpuBuffer>; 4] {
        let (heads, kv_heads, hd) = ATTENTION_HEADS;
        let at = &self.attention;
        let [wq, wk, wv, wo, gate, up, down] = &self.w;
        let (wtype, eps) = (TUNE_WTYPE, 1e-5);
        [
            Op::NormQkvRope {
                a: &io.x2,
                h: &io.h,
                norm: &io.norm,
                sum: &io.x,
                wq,
                wk,
                wv,
                q: &io.q,
                k: &io.k,
                v: &io.v,
                table: &at.table,
                q_out: &at.q,
                k_cache: &at.k,
                v_cache: &at.v,
                q_factors: None,
                k_factors: None,
                v_factors: None,
                wtype,
                dim: DIM,
                n_q: heads * hd,
                n_kv: kv_heads * hd,
                eps,
                head_dim: hd,
                pos: at.pos0,
                style: RopeStyle::Interleaved,
            },
            Op::QMatmul {
                x: &at.out,
                w: wo,
                factors: None,
                out: &io.h,
                wtype,
                m: 1,
                k: heads * hd,
                n: DIM,
            },
            Op::NormMatvec {
                a: &io.x,
                h: &io.h,
                norm: &io.norm,
                w: gate,
                out: &io.act,
                sum: Some(&io.x2),
                factors: None,
                up: Some(up),
                up_factors: None,
                wtype,
                k: DIM,
                n: FFN,
                eps,
            },
            Op::QMatmul {
                x: &io.act,
                w: down,
                factors: None,
                out: &io.h,
                wtype,
                m: 1,
                k: FFN,
                n: DIM,
            },
        ]
    }
}

/// Measures every candidate on SmolLM2-135M's shapes (eight layers' decode-step products
/// as [`DecodeLayer`] runs them, a wide output head, eight layers' decode attention at 512
/// positions with its RoPE and cache write; where subgroups are 8 invocations, also a 128-token prompt's attention with its cache
/// write and a 64-row Q4_1 product, whose choice then serves Q8_0 and Q4_0 too) and
/// returns the fastest of each, with the timings for the cache.
fn measure(gpu: &mut Gpu) -> Result<(KernelShapes, Vec<String>)> {
    let mut best = KernelShapes::default();
    let mut timings = Vec::new();
    let wtype = TUNE_WTYPE;
    // The projections as a model's decode step runs them, over eight layers' weights (a
    // shape that fills the threads on 1536 rows can leave them idle on 192), and a wide
    // output head.
    let io = LayerIo::new(gpu)?;
    let layers = (0..DECODE_LAYERS)
        .map(|_| DecodeLayer::new(gpu))
        .collect::<Result<Vec<_>>>()?;
    let (x, w, out) = product_buffers(gpu, wtype, 1, DIM, WIDE_FROM)?;
    let head = [Op::QMatmul {
        x: &x,
        w: &w,
        factors: None,
        out: &out,
        wtype,
        m: 1,
        k: DIM,
        n: WIDE_FROM,
    }];
    let layer_products: Vec<_> = layers.iter().flat_map(|l| l.ops(&io)).collect();
    for (wide, ops) in [(false, &layer_products[..]), (true, &head[..])] {
        let label = if wide { "head" } else { "layer" };
        let candidates = matvec_candidates()
            .into_iter()
            .filter(|m| !m.subgroup || gpu.subgroups_of_8())
            .collect();
        let shape = fastest_for_memory(
            gpu,
            ops,
            candidates,
            |m| m.texture,
            TEXTURE_GAIN,
            &mut timings,
            |m| {
                (
                    KernelShapes {
                        matvec: m,
                        matvec_wide: m,
                        ..best
                    },
                    format!("matvec {label} {}", m.spec()),
                )
            },
        )?;
        if wide {
            best.matvec_wide = shape;
        } else {
            best.matvec = shape;
        }
    }
    // A decode step's attention with the RoPE and cache write before it (a separate
    // dispatch here, inside the q/k/v one for GGUF models; the same for every candidate):
    // the KV textures' copy of each new row is part of what is timed.
    let at = decode_attention(gpu, 511)?;
    let candidates = attention_candidates()
        .into_iter()
        .filter(|a| !a.subgroup || gpu.subgroups_of_8())
        .collect();
    best.attention_decode = fastest_for_memory(
        gpu,
        &layer_ops(&at),
        candidates,
        |a| a.texture,
        TEXTURE_GAIN,
        &mut timings,
        |a| {
            (
                KernelShapes {
                    attention_decode: a,
                    ..best
                },
                format!("attention decode {}", a.spec()),
            )
        },
    )?;
    // One pass instead of the chosen chunks and their merge, for the longest context at
    // which it is still faster, measured there: its time grows with the context, the
    // chunks' hardly.
    if best.attention_decode.subgroup {
        for n in ONE_PASS {
            let at = decode_attention(gpu, n - 1)?;
            let chunked = best.attention_decode;
            let one = AttentionShape {
                one_pass: n,
                ..chunked
            };
            let ops = layer_ops(&at);
            let (choice, _) = fastest(gpu, &ops, vec![chunked, one], &mut timings, |a| {
                (
                    KernelShapes {
                        attention_decode: a,
                        ..best
                    },
                    format!("attention decode at {n} positions {}", a.spec()),
                )
            })?;
            if choice.one_pass > 0 {
                best.attention_decode = choice;
                break;
            }
        }
    }
    // A prompt's attention: 128 tokens, each over the positions up to its own.
    if gpu.subgroups_of_8() {
        // With its RoPE and cache write, as in a model, so that `sg8t`'s copy of the
        // written keys and values into textures is timed too.
        let prompt = AttentionStep::new(gpu, 0, 128)?;
        // The cache's textures are free where decode attention already made them.
        let gain = if best.attention_decode.texture {
            1.0
        } else {
            TEXTURE_GAIN
        };
        best.attention_prefill = fastest_for_memory(
            gpu,
            &prompt.ops(),
            VARIANTS.to_vec(),
            |v| *v == Variant::Subgroup8Texture,
            gain,
            &mut timings,
            |a| {
                (
                    KernelShapes {
                        attention_prefill: a,
                        ..best
                    },
                    format!("attention prefill {}", a.spec()),
                )
            },
        )?;
        // A prompt's product: 64 rows of x, a projection's weights.
        let (m, k, n) = (64u32, 576u32, 1536u32);
        let (x, w, out) = product_buffers(gpu, wtype, m, k, n)?;
        let op = Op::QMatmul {
            x: &x,
            w: &w,
            factors: None,
            out: &out,
            wtype,
            m,
            k,
            n,
        };
        // Textures are free where the projections' decode products already made them (the
        // wide products' choice covers only output heads).
        let gain = if best.matvec.texture {
            1.0
        } else {
            TEXTURE_GAIN
        };
        best.prompt_matmul = fastest_for_memory(
            gpu,
            &[op],
            VARIANTS.to_vec(),
            |v| *v == Variant::Subgroup8Texture,
            gain,
            &mut timings,
            |v| {
                (
                    KernelShapes {
                        prompt_matmul: v,
                        ..best
                    },
                    format!("prompt matmul {}", v.spec()),
                )
            },
        )?;
    }
    Ok((best, timings))
}

/// x (m x k), synthetic `wtype` weights (n rows of k, scales small enough to stay finite)
/// and out (m x n) for timing a product.
fn product_buffers(
    gpu: &Gpu,
    wtype: WeightType,
    m: u32,
    k: u32,
    n: u32,
) -> Result<(GpuBuffer, GpuBuffer, GpuBuffer)> {
    let x = gpu.upload_f32(&vec![0.5; m as usize * k as usize], "tune x")?;
    let w = synthetic_weights(gpu, wtype, k, n)?;
    let out = gpu.alloc(u64::from(m) * u64::from(n) * 4, "tune out")?;
    Ok((x, w, out))
}

/// `wtype` weights of n rows of k, with scales small enough to keep sums finite.
fn synthetic_weights(gpu: &Gpu, wtype: WeightType, k: u32, n: u32) -> Result<GpuBuffer> {
    let bytes: Vec<u8> = (0..wtype.row_bytes(k as usize)? * n as usize)
        .map(|i| if i % 20 < 4 { 0x30 } else { i as u8 })
        .collect();
    gpu.upload_weights(wtype, &bytes, k, "tune w")
}

/// The weight type timed: the products' choice serves Q8_0 and Q4_0 too.
const TUNE_WTYPE: WeightType = WeightType::Q4_1;

/// How much faster a texture candidate must run what it is timed on to be chosen (it
/// holds the weights, or the KV cache, a second time): 1.1x, clear of the measurement's
/// noise. In a decode step's layers lavapipe's texture products measured 3x faster
/// without AVX-512 and about 1.17x with it (1.33x for the output head), which generated
/// 1.2x faster (BENCHMARKS.md, eighteenth part).
const TEXTURE_GAIN: f64 = 1.1;

/// The candidate whose shapes (`shapes_of` gives them and a label) run `op` fastest, and
/// its time; each candidate's time is added to `timings`.
fn fastest<T: Copy>(
    gpu: &mut Gpu,
    ops: &[Op<'_, GpuBuffer>],
    candidates: Vec<T>,
    timings: &mut Vec<String>,
    shapes_of: impl Fn(T) -> (KernelShapes, String),
) -> Result<(T, f64)> {
    let mut best: Option<(f64, T)> = None;
    let mut times = vec![f64::INFINITY; candidates.len()];
    // Two rounds, each candidate keeping its faster time: on a shared host a burst of
    // other work can inflate one measurement (or cut it short as hopeless), rarely both.
    for _ in 0..2 {
        for (c, t) in candidates.iter().zip(&mut times) {
            let bound = best.map_or(f64::INFINITY, |b| b.0);
            let s = time_op(gpu, shapes_of(*c).0, ops, bound)?;
            *t = t.min(s);
            if s < bound {
                best = Some((s, *c));
            }
        }
    }
    for (c, t) in candidates.iter().zip(&times) {
        timings.push(format!("{}: {:.1}", shapes_of(*c).1, t * 1e6));
    }
    best.map(|b| (b.1, b.0))
        .ok_or_else(|| Error::InvalidArgument {
            name: "kernel shapes",
            reason: "no candidate to measure".into(),
        })
}

/// The fastest of `candidates`, except that one reading weights from textures
/// (`is_texture`) is taken only when `gain` times faster than the fastest that does not:
/// textures hold the weights a second time.
fn fastest_for_memory<T: Copy>(
    gpu: &mut Gpu,
    ops: &[Op<'_, GpuBuffer>],
    candidates: Vec<T>,
    is_texture: impl Fn(&T) -> bool,
    gain: f64,
    timings: &mut Vec<String>,
    shapes_of: impl Fn(T) -> (KernelShapes, String),
) -> Result<T> {
    let (textures, buffers): (Vec<T>, Vec<T>) = candidates.into_iter().partition(is_texture);
    let (choice, time) = fastest(gpu, ops, buffers, timings, &shapes_of)?;
    if textures.is_empty() {
        return Ok(choice);
    }
    let (t_choice, t_time) = fastest(gpu, ops, textures, timings, &shapes_of)?;
    Ok(if t_time * gain < time {
        t_choice
    } else {
        choice
    })
}

/// Applies `tuning` to a freshly opened device: see [`Tuning`].
pub(crate) fn autotune(gpu: &mut Gpu, tuning: &Tuning, dir: Option<&Path>) -> Result<TuneReport> {
    let subgroups = gpu.subgroups_of_8();
    let report = |shapes: KernelShapes, origin: &str, mut notes: Vec<String>| {
        if subgroups {
            notes.extend(shapes.held_twice());
        }
        TuneReport {
            shapes,
            origin: origin.to_string(),
            notes,
        }
    };
    let r = gpu.report();
    // The candidates, the kernels' source and the measured shapes are part of the
    // identity: a cache measured before a kernel form existed, a kernel changed or the
    // measurement did (the crate version need not change) is measured again, not trusted.
    let kernels = fnv1a(SHADERS.iter().flat_map(|(_, src)| src.bytes()));
    let candidates: Vec<String> = matvec_candidates()
        .iter()
        .map(MatvecShape::spec)
        .chain(attention_candidates().iter().map(AttentionShape::spec))
        .chain(ONE_PASS.iter().map(|n| format!("/{n}")))
        .chain(VARIANTS.iter().map(|v| v.spec().to_string()))
        .collect();
    let identity = format!(
        "edgetune {} kernels {kernels:016x} | {} | {} | {} {} | {:04x}:{:04x} | subgroups {} | {} | decode layer (dim, ffn, heads) {:?}{}",
        env!("CARGO_PKG_VERSION"),
        r.name,
        r.backend,
        r.driver,
        r.driver_info,
        gpu.vendor_device().0,
        gpu.vendor_device().1,
        gpu.subgroups_of_8(),
        candidates.join(" "),
        (DIM, FFN, ATTENTION_HEADS),
        if is_llvmpipe(&r) {
            llvmpipe_codegen()
        } else {
            String::new()
        },
    );
    let path = cache_path(&identity, dir);
    let mut notes = Vec::new();
    if is_llvmpipe(&r) {
        notes.push(llvmpipe_thread_note());
        notes.extend(slow_llvmpipe(
            &r.driver_info,
            Isa::Avx512.available(),
            caps_overridden(),
        ));
    }
    match tuning {
        Tuning::Defaults => return Ok(report(KernelShapes::default(), "defaults", notes)),
        Tuning::Force(s) => {
            let wanted = s.subgroup_choices();
            if !wanted.is_empty() && !gpu.subgroups_of_8() {
                notes.push(format!(
                    "the subgroup kernels chosen for {} need subgroups of exactly 8 \
                     invocations and bindings (read-only storage textures, uniform copies \
                     of x) that this device lacks: it runs the portable kernels",
                    wanted.join(", ")
                ));
            }
            gpu.set_shapes(*s);
            return Ok(report(*s, "forced", notes));
        }
        Tuning::Cached => match &path {
            Some(p) if p.exists() => match load(p, &identity) {
                Ok(s) => {
                    gpu.set_shapes(s);
                    return Ok(report(s, &format!("cached in {}", p.display()), notes));
                }
                Err(why) => notes.push(format!(
                    "ignored the kernel shape cache {}: {why}; measuring again",
                    p.display()
                )),
            },
            _ => {}
        },
        Tuning::Measure => {}
    }
    let start = Instant::now();
    let (shapes, timings) = measure(gpu)?;
    gpu.set_shapes(shapes);
    let took = format!("measured now ({:.1} s)", start.elapsed().as_secs_f64());
    let origin = match &path {
        Some(p) => match save(p, &identity, &shapes, &timings) {
            Ok(()) => format!("{took}, cached in {}", p.display()),
            Err(e) => {
                notes.push(format!("could not cache the kernel shapes: {e}"));
                took
            }
        },
        None => {
            notes.push("no cache directory (EDGETUNE_CACHE_DIR, XDG_CACHE_HOME, HOME)".into());
            took
        }
    };
    Ok(report(shapes, &origin, notes))
}

/// What else sets llvmpipe's code generation and threads, and so its fastest shapes, while
/// its name and driver string stay the same (a cache directory can be shared by hosts with
/// different processors).
fn llvmpipe_codegen() -> String {
    let env: Vec<String> = LLVMPIPE_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
        .collect();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    // The host's widest vector instructions (what llvmpipe generates code for).
    let isa = Isa::detect().name();
    format!(" | {isa} | {cpus} cpus | {}", env.join(" "))
}

/// Environment variables that change llvmpipe's code or threads.
const LLVMPIPE_ENV: [&str; 4] = [
    "GALLIUM_OVERRIDE_CPU_CAPS",
    "GALLIUM_NOSSE",
    "LP_NATIVE_VECTOR_WIDTH",
    "LP_NUM_THREADS",
];

/// Threads llvmpipe runs each dispatch on where [`use_llvmpipe_threads`] sets them: twice
/// the logical CPUs this process may use (`available_parallelism`, which respects affinity
/// and cgroup quotas). llvmpipe deals a dispatch's workgroups out to its threads in equal
/// runs fixed up front (Mesa's `lp_cs_tpool`), so a decode step's small dispatches (3 to 7
/// workgroups on SmolLM2) leave a CPU idle, and a thread that a neighbour slows holds up
/// the whole dispatch; with twice as many threads as CPUs the OS scheduler evens the runs
/// out (BENCHMARKS.md, sixteenth part: generation 1.2x on 2 CPUs, prompt and training
/// within noise; the factor was measured on 2 CPUs only).
fn default_llvmpipe_threads() -> usize {
    2 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets `LP_NUM_THREADS` to [`default_llvmpipe_threads`] where the environment does not set it.
/// llvmpipe reads it when an instance finds the device, so this goes before opening a GPU.
///
/// # Safety
///
/// As for [`std::env::set_var`]: no other thread may read or write the environment
/// meanwhile (call it first thing in `main`).
#[allow(unsafe_code)]
pub unsafe fn use_llvmpipe_threads() {
    if std::env::var_os("LP_NUM_THREADS").is_none() {
        // SAFETY: the caller's guarantee.
        unsafe { std::env::set_var("LP_NUM_THREADS", default_llvmpipe_threads().to_string()) };
    }
}

/// The notice naming llvmpipe's thread count, as llvmpipe reads it (capped at its
/// compile-time LP_MAX_THREADS).
fn llvmpipe_thread_note() -> String {
    match std::env::var_os("LP_NUM_THREADS") {
        Some(n) if n == "0" => {
            "llvmpipe runs on the submitting thread only (LP_NUM_THREADS=0)".into()
        }
        Some(n) => format!(
            "llvmpipe runs {} threads, at most its maximum (LP_NUM_THREADS)",
            n.to_string_lossy()
        ),
        None => "llvmpipe runs a thread per CPU, at most its maximum (LP_NUM_THREADS unset)".into(),
    }
}

fn is_llvmpipe(r: &super::wgpu::AdapterReport) -> bool {
    // Vulkan (lavapipe) names the driver; GL only the renderer.
    r.driver == "llvmpipe" || r.name.starts_with("llvmpipe")
}

/// Whether GALLIUM_OVERRIDE_CPU_CAPS holds one of the values Mesa acts on (it ignores
/// others), each of which turns AVX-512 off.
fn caps_overridden() -> bool {
    std::env::var("GALLIUM_OVERRIDE_CPU_CAPS").is_ok_and(|v| {
        matches!(
            v.as_str(),
            "nosse" | "sse" | "sse2" | "sse3" | "ssse3" | "sse4.1" | "avx"
        )
    })
}

/// A notice for llvmpipe from Mesa 22 or older generating x86 code without AVX-512. That
/// Mesa loads and stores storage buffers one invocation at a time, inserting each 32-bit
/// word at a run-time lane index, and without AVX-512 LLVM does that insert through the
/// stack (a store-forwarding stall per word). Mesa 25.0 loads through masked gathers and
/// ran SmolLM2 2-3x faster there before the texture candidates; 23 and 24 are not measured
/// (BENCHMARKS.md, seventh and eighth parts).
fn slow_llvmpipe(driver_info: &str, host_avx512: bool, capped: bool) -> Option<String> {
    let version = driver_info
        .split("Mesa ")
        .nth(1)?
        .split([' ', '('])
        .next()?;
    let major: u32 = version.split('.').next()?.parse().ok()?;
    let avx512 = host_avx512 && !capped;
    (cfg!(target_arch = "x86_64") && major <= 22 && !avx512).then(|| {
        format!(
            "llvmpipe from Mesa {version} without AVX-512{} loads GPU buffers word by word \
             through the stack: the products read their weights, and decode attention the KV \
             cache, from textures instead where that measures faster (holding them twice), \
             the other kernels still pay; Mesa 25 \
             (Debian 12: bookworm-backports) loads with gathers, and the multi-threaded CPU \
             path is faster still",
            if host_avx512 {
                " (GALLIUM_OVERRIDE_CPU_CAPS turns it off)"
            } else {
                ""
            }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texture_forms_are_named_as_held_twice() {
        let held = |spec: &str| KernelShapes::parse(spec).unwrap().held_twice();
        assert_eq!(held("matvec=16x8g,attention_decode=8q"), None);
        for (spec, what) in [
            ("matvec_wide=32x8gt", "hold the quantised weights a"),
            ("prompt_matmul=sg8t", "hold the quantised weights a"),
            ("attention_decode=32dt", "hold the KV cache"),
            ("attention_prefill=sg8t", "hold the KV cache"),
            (
                "matvec=16x8gt,attention_decode=64dt/1024",
                "the quantised weights and the KV cache",
            ),
        ] {
            let note = held(spec).unwrap_or_default();
            assert!(note.contains(what), "{spec}: {note}");
        }
    }

    #[test]
    fn old_llvmpipe_without_avx512_gets_a_notice() {
        let x86 = cfg!(target_arch = "x86_64");
        let old = "Mesa 22.3.6 (LLVM 15.0.6)";
        let note = slow_llvmpipe(old, false, false);
        assert_eq!(note.is_some(), x86);
        if let Some(n) = note {
            assert!(
                n.starts_with("llvmpipe from Mesa 22.3.6 without AVX-512 loads"),
                "{n}"
            );
        }
        assert_eq!(slow_llvmpipe(old, true, false), None);
        let capped = slow_llvmpipe(old, true, true);
        assert_eq!(capped.is_some(), x86);
        if let Some(n) = capped {
            assert!(n.contains("GALLIUM_OVERRIDE_CPU_CAPS turns it off"), "{n}");
        }
        // GL reports the version after the OpenGL one.
        let gl = "4.5 (Core Profile) Mesa 22.3.6";
        assert_eq!(slow_llvmpipe(gl, false, false).is_some(), x86);
        let new = "Mesa 25.0.7-2~bpo12+1 (LLVM 15.0.6)";
        assert_eq!(slow_llvmpipe(new, false, false), None);
        for odd in ["", "Mesa", "Mesa x.1", "580.159.04", "Mesa 22"] {
            assert_eq!(
                slow_llvmpipe(odd, false, false).is_some(),
                odd == "Mesa 22" && x86,
                "{odd}"
            );
        }
    }

    #[test]
    fn spec_round_trips_and_rejects_what_is_not_a_candidate() {
        for c in KernelShapes::covering() {
            assert_eq!(KernelShapes::parse(&c.spec()).unwrap(), c);
        }
        assert_eq!(KernelShapes::parse("").unwrap(), KernelShapes::default());
        let partial = KernelShapes::parse("attention_decode=64").unwrap();
        let sg = KernelShapes::parse("attention_prefill=sg8,prompt_matmul=sg8").unwrap();
        assert_eq!(sg.attention_prefill, Variant::Subgroup8);
        assert_eq!(sg.prompt_matmul, Variant::Subgroup8);
        assert_eq!(
            sg.subgroup_choices(),
            ["attention_prefill", "prompt_matmul"]
        );
        assert_eq!(partial.attention_decode.wg, 64);
        let split = KernelShapes::parse("attention_decode=8s")
            .unwrap()
            .attention_decode;
        assert!(split.split && !split.gqa && split.wg == 8);
        let gqa = KernelShapes::parse("attention_decode=16q")
            .unwrap()
            .attention_decode;
        assert!(gqa.split && gqa.gqa && gqa.wg == 16 && gqa.spec() == "16q");
        let chunked = KernelShapes::parse("attention_decode=64dt").unwrap();
        let a = chunked.attention_decode;
        assert!(a.subgroup && a.texture && !a.split && a.wg == 64 && a.spec() == "64dt");
        assert_eq!(chunked.subgroup_choices(), ["attention_decode"]);
        let a = KernelShapes::parse("attention_decode=32d")
            .unwrap()
            .attention_decode;
        assert!(a.subgroup && !a.texture && a.wg == 32 && a.spec() == "32d");
        let a = KernelShapes::parse("attention_decode=64dt/512")
            .unwrap()
            .attention_decode;
        assert!(a.subgroup && a.texture && a.wg == 64 && a.one_pass == 512);
        assert_eq!(a.spec(), "64dt/512");
        assert_eq!(partial.matvec, KernelShapes::default().matvec);
        let split = KernelShapes::parse("matvec_wide=32x8s")
            .unwrap()
            .matvec_wide;
        assert!(split.split && split.wg == 32 && split.rows == 8);
        let sg = KernelShapes::parse("matvec=16x4g").unwrap().matvec;
        assert!(sg.subgroup && !sg.split && sg.wg == 16 && sg.rows == 4);
        let tex = KernelShapes::parse("matvec_wide=8x8gt,prompt_matmul=sg8t").unwrap();
        let m = tex.matvec_wide;
        assert!(m.subgroup && m.texture && !m.split && m.wg == 8 && m.rows == 8);
        assert_eq!(tex.prompt_matmul, Variant::Subgroup8Texture);
        let prefill = KernelShapes::parse("attention_prefill=sg8t").unwrap();
        assert_eq!(prefill.attention_prefill, Variant::Subgroup8Texture);
        assert_eq!(tex.subgroup_choices(), ["prompt_matmul", "matvec_wide"]);
        for bad in [
            "matvec=7x4",
            "matvec=16x5",
            "matvec=16x4t",
            "matvec=16x4ss",
            "matvec=16x4gs",
            "matvec=16x4sg",
            "attention_decode=4s",
            "attention_decode=4q",
            "attention_decode=16qs",
            "attention_decode=8",
            "attention_decode=16d",
            "attention_decode=32td",
            "attention_decode=32dq",
            "attention_decode=32dt/300",
            "attention_decode=16q/512",
            "attention_decode=32dt/",
            "matvec=16",
            "speed=11",
            "matvec",
            "attention_decode=-1",
            "attention_prefill=sg4",
            "matvec=16x4tg",
            "matvec=16x4st",
            "prompt_matmul=v4",
        ] {
            let err = KernelShapes::parse(bad).unwrap_err().to_string();
            assert!(err.contains("kernel shapes"), "{bad}: {err}");
        }
    }
}
