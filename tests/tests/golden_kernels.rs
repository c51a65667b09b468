//! The kernels on every backend against golden files from independent implementations
//! (gguf-py for dequantisation, numpy in float64 for the rest), produced by
//! tools/reference/kernels_golden.py. The CPU reference always runs; the GPU when present.

mod common;

use edgetune::backend::{RopeScaling, RopeStyle, rope_table};
use edgetune::{Backend, Op, WeightType};
use serde_json::Value;

struct Golden {
    manifest: Value,
    blob: Vec<u8>,
}

impl Golden {
    fn load() -> Golden {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
        let manifest =
            serde_json::from_str(&std::fs::read_to_string(dir.join("kernels.json")).unwrap())
                .unwrap();
        let blob = std::fs::read(dir.join("kernels.bin")).unwrap();
        Golden { manifest, blob }
    }

    fn bytes(&self, t: &Value) -> Vec<u8> {
        let off = t["offset"].as_u64().unwrap() as usize;
        let size = match t["dtype"].as_str().unwrap() {
            "uint8" => 1,
            "float32" => 4,
            other => panic!("dtype {other}"),
        };
        self.blob[off..off + size * t["len"].as_u64().unwrap() as usize].to_vec()
    }

    fn f32s(&self, t: &Value) -> Vec<f32> {
        self.bytes(t)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn wtype(name: &str) -> WeightType {
    WeightType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap()
}

fn u32_of(p: &Value, key: &str) -> u32 {
    p[key].as_u64().unwrap() as u32
}

/// Runs every golden case on `dev`; returns the failures.
fn run_all<B: Backend>(dev: &B) -> Vec<String> {
    let g = Golden::load();
    let cases = g.manifest["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 30,
        "golden manifest has {} cases",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in cases {
        let kind = case["kind"].as_str().unwrap();
        let p = &case["params"];
        let t = &case["tensors"];
        if kind == "quantize" {
            // Host-side: the same on every backend; checked byte for byte.
            let x = g.f32s(&t["x"]);
            let got = match p["wtype"].as_str().unwrap() {
                "q8_0" => edgetune::quant::quantize_q8_0(&x).unwrap(),
                _ => edgetune::quant::quantize_q4_0(&x).unwrap(),
            };
            if got != g.bytes(&t["q"]) {
                failures.push(format!("quantize {p}: bytes differ from gguf-py"));
            }
            continue;
        }
        let up = |name: &str| dev.upload(&g.bytes(&t[name]), "golden").unwrap();
        let want = g.f32s(&t["out"]);
        let out = dev.alloc(want.len() as u64 * 4, "out").unwrap();
        // (exact, atol, rtol) against the float64 or gguf-py truth.
        let (exact, atol, rtol) = match kind {
            "dequant" => (true, 0.0, 0.0),
            "qmatmul" | "matmul" => (false, 1e-5 * f64::from(u32_of(p, "k")), 1e-5),
            _ => (false, 1e-6, 1e-5),
        };
        let mut bufs: Vec<_> = ["w", "x", "a", "b", "weight", "gate", "up", "q", "k", "v"]
            .iter()
            .map(|n| t.get(*n).map(|_| up(n)))
            .collect();
        if let Some(name) = p["wtype"].as_str() {
            // Dequantisation cases are one row of n elements.
            let cols = if kind == "dequant" {
                u32_of(p, "n")
            } else {
                u32_of(p, "k")
            };
            bufs[0] = Some(
                dev.upload_weights(wtype(name), &g.bytes(&t["w"]), cols, "golden weights")
                    .unwrap(),
            );
        }
        let b = |i: usize| bufs[i].as_ref().unwrap();
        let table;
        let op = match kind {
            "dequant" => Op::Dequant {
                w: b(0),
                factors: None,
                out: &out,
                wtype: wtype(p["wtype"].as_str().unwrap()),
                rows: 1,
                cols: u32_of(p, "n"),
            },
            "qmatmul" => Op::QMatmul {
                x: b(1),
                w: b(0),
                factors: None,
                out: &out,
                wtype: wtype(p["wtype"].as_str().unwrap()),
                m: u32_of(p, "m"),
                k: u32_of(p, "k"),
                n: u32_of(p, "n"),
            },
            "matmul" => Op::Matmul {
                a: b(2),
                b: b(3),
                out: &out,
                m: u32_of(p, "m"),
                k: u32_of(p, "k"),
                n: u32_of(p, "n"),
                a_t: p["a_t"].as_bool().unwrap(),
                b_t: p["b_t"].as_bool().unwrap(),
            },
            "rmsnorm" => Op::RmsNorm {
                x: b(1),
                weight: b(4),
                out: &out,
                rows: u32_of(p, "rows"),
                dim: u32_of(p, "dim"),
                eps: p["eps"].as_f64().unwrap() as f32,
            },
            "rope" => {
                let (n_tokens, head_dim, pos0) = (
                    u32_of(p, "n_tokens"),
                    u32_of(p, "head_dim"),
                    u32_of(p, "pos0"),
                );
                table = dev
                    .upload_f32(
                        &rope_table(
                            p["theta"].as_f64().unwrap(),
                            head_dim,
                            pos0 + n_tokens,
                            &RopeScaling::None,
                        ),
                        "table",
                    )
                    .unwrap();
                Op::Rope {
                    x: b(1),
                    table: &table,
                    out: &out,
                    n_tokens,
                    n_heads: u32_of(p, "n_heads"),
                    head_dim,
                    pos0,
                    row0: 0,
                    style: if p["style"] == "half_split" {
                        RopeStyle::HalfSplit
                    } else {
                        RopeStyle::Interleaved
                    },
                }
            }
            "softmax" => Op::Softmax {
                x: b(1),
                out: &out,
                rows: u32_of(p, "rows"),
                cols: u32_of(p, "cols"),
            },
            "swiglu" => Op::SwiGlu {
                gate: b(5),
                up: b(6),
                out: &out,
                n: u32_of(p, "n"),
            },
            "attention" => Op::Attention {
                q: b(7),
                k: b(8),
                v: b(9),
                out: &out,
                n_tokens: u32_of(p, "n_tokens"),
                n_heads: u32_of(p, "n_heads"),
                n_kv_heads: u32_of(p, "n_kv_heads"),
                head_dim: u32_of(p, "head_dim"),
                pos0: u32_of(p, "pos0"),
                row0: 0,
                scale: p["scale"].as_f64().unwrap() as f32,
            },
            other => panic!("unknown golden kind {other}"),
        };
        dev.run(&op).unwrap();
        let got = dev.read_f32(&out, want.len()).unwrap();
        let bad = got.iter().zip(&want).position(|(&g, &w)| {
            if exact {
                g.to_bits() != w.to_bits()
            } else {
                f64::from((g - w).abs()) > atol + rtol * f64::from(w.abs())
            }
        });
        if let Some(i) = bad {
            failures.push(format!(
                "{kind} {p}: element {i}: got {} want {}",
                got[i], want[i]
            ));
        }
    }
    failures
}

#[test]
fn cpu_reference_matches_independent_implementations() {
    let failures = run_all(&edgetune::backend::cpu::Cpu);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn gpu_matches_independent_implementations() {
    let Some(gpu) = common::gpu() else { return };
    let failures = run_all(&gpu);
    assert!(failures.is_empty(), "{failures:#?}");
}
