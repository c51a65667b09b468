//! Backpropagation through the frozen model into its adapter (LoRA or IA3): a forward pass
//! that keeps what the backward pass reads (a [`Tape`]), the loss over a chunk of the
//! output head's rows at a time, then the layers in reverse, each trainable tensor's
//! gradient added into its buffer. The frozen weights are only read; normed inputs and the
//! SwiGLU product are recomputed rather than kept.

use super::{
    AdapterRoom, HEAD_CHUNK, Layer, LayerBufs, LayerIn, Linear, Model, Scratch, attention_scale,
    runs,
};
use crate::adapter::{Method, Slot, Target};
use crate::backend::{Backend, Op, rope_table};
use crate::error::{Error, Result};
use std::prelude::v1::*;

/// One layer's activations kept by the forward pass (beside its input).
#[derive(Debug)]
struct Saved<B: Backend> {
    qr: B::Buffer,
    kr: B::Buffer,
    v: B::Buffer,
    att: B::Buffer,
    x2: B::Buffer,
    gate: B::Buffer,
    up: B::Buffer,
}

/// The backward pass's working buffers.
#[derive(Debug)]
struct Temps<B: Backend> {
    /// Zeros, \[t, dim\]: what `dres` starts from.
    zeros: B::Buffer,
    dres: B::Buffer,
    dh: B::Buffer,
    dx: B::Buffer,
    datt: B::Buffer,
    dqr: B::Buffer,
    dq: B::Buffer,
    dkr: B::Buffer,
    dk: B::Buffer,
    dv: B::Buffer,
    stats: B::Buffer,
    dact: B::Buffer,
    dgate: B::Buffer,
    dup: B::Buffer,
    // A projection's backward: scaled input, recomputed output, scaled gradient, the input
    // gradient before IA3's input scales, LoRA's low-rank terms and parameter gradients.
    input: B::Buffer,
    pre: B::Buffer,
    g: B::Buffer,
    dinput: B::Buffer,
    low: [B::Buffer; 4],
    dparam: B::Buffer,
    // The output head, HEAD_CHUNK rows at a time.
    xs: B::Buffer,
    normed: B::Buffer,
    logits: B::Buffer,
    dlogits: B::Buffer,
    loss: B::Buffer,
    dnormed: B::Buffer,
}

/// What backpropagation through a model keeps for sequences of up to `capacity` tokens:
/// every layer's input and activations (or, with recomputation, the inputs and one layer's
/// activations, recomputed layer by layer during the backward pass), the RoPE tables and
/// the backward pass's buffers. Made once per training run by [`Model::tape`] and reused
/// for every sequence.
#[derive(Debug)]
pub struct Tape<B: Backend> {
    capacity: u32,
    /// Each layer's input (the residual stream).
    inputs: Vec<B::Buffer>,
    /// Whether `layers` holds one set of activations, recomputed layer by layer.
    recompute: bool,
    rope: B::Buffer,
    /// The table with its sines negated: the rotation's transpose, RoPE's backward.
    rope_inv: B::Buffer,
    layers: Vec<Saved<B>>,
    last: B::Buffer,
    scratch: Scratch<B>,
    t: Temps<B>,
    bytes: u64,
}

impl<B: Backend> Tape<B> {
    /// Layer `i`'s forward buffers: its input, activation set `saved`, output `out`.
    fn bufs<'a>(&'a self, i: usize, saved: usize, out: &'a B::Buffer) -> LayerBufs<'a, B> {
        let (l, s) = (&self.layers[saved], &self.scratch);
        LayerBufs {
            x: &self.inputs[i],
            x2: &l.x2,
            out,
            h: &s.h,
            q: &s.q,
            qr: &l.qr,
            k: &s.k,
            kr: &l.kr,
            v: &l.v,
            att: &l.att,
            gate: &l.gate,
            up: &l.up,
            act: &s.act,
        }
    }

    /// Bytes of device memory the tape holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The longest sequence it takes.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }
}

/// Counts the bytes of what it allocates.
struct Alloc<'a, B: Backend> {
    be: &'a B,
    bytes: u64,
}

impl<B: Backend> Alloc<'_, B> {
    fn f32s(&mut self, n: u64, what: &'static str) -> Result<B::Buffer> {
        let bytes = n.checked_mul(4).ok_or_else(|| Error::InvalidShape {
            op: "tape",
            reason: format!("{n} values overflow"),
        })?;
        self.bytes += bytes;
        self.be.alloc(bytes, what)
    }
}

/// Element counts of a tape's buffers: tokens, widths, LoRA's rank, head rows per chunk.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    t: u64,
    dim: u64,
    q: u64,
    kv: u64,
    ffn: u64,
    widest: u64,
    rank: u64,
    chunk: u64,
}

/// The gradient buffers of one projection's trainable tensors (indices into the layout).
#[derive(Debug, Clone, Copy, Default)]
struct LinearGrads {
    a: Option<usize>,
    b: Option<usize>,
    scale: Option<usize>,
}

impl<'b, B: Backend> Model<'b, B> {
    /// The device memory a [`Tape`] for `capacity` tokens would take, in bytes, without
    /// allocating it: a batch that does not fit is refused before the first step.
    pub fn tape_bytes(&self, capacity: u32, recompute: bool) -> u64 {
        let Sizes {
            t,
            dim,
            q,
            kv,
            ffn,
            widest,
            rank,
            chunk,
        } = self.sizes(capacity);
        let c = &self.cfg;
        let rank = rank.max(1);
        // What `tape` allocates, buffer by buffer (it checks that the two agree).
        let saved = t * (2 * q + 2 * kv + dim + 2 * ffn);
        let sets = if recompute { 1 } else { u64::from(c.n_layers) };
        let temps = t * (3 * dim + 5 * widest + 3 * q + 3 * kv + 3 * ffn + 4 * rank)
            + t * u64::from(c.n_heads) * 2
            + rank * widest
            + chunk * (3 * dim + 2 * u64::from(c.vocab) + 1);
        let floats = u64::from(c.n_layers) * t * dim + sets * saved + t * dim + temps;
        4 * floats + 8 * t * u64::from(c.head_dim) + Scratch::<B>::bytes(c, t, rank)
    }

    /// The widths a tape for `capacity` tokens is made of.
    fn sizes(&self, capacity: u32) -> Sizes {
        let c = &self.cfg;
        let (q, kv, ffn, dim) = (
            u64::from(c.n_heads * c.head_dim),
            u64::from(c.n_kv_heads * c.head_dim),
            u64::from(c.ffn_dim),
            u64::from(c.dim),
        );
        Sizes {
            t: u64::from(capacity),
            dim,
            q,
            kv,
            ffn,
            widest: [dim, q, ffn].into_iter().fold(kv, u64::max),
            rank: u64::from(self.lora_rank()),
            chunk: u64::from(HEAD_CHUNK),
        }
    }

    fn lora_rank(&self) -> u32 {
        match self.adapter() {
            Some(a) => match a.method {
                Method::Lora { rank, .. } => rank,
                _ => 1,
            },
            None => 0,
        }
    }

    /// A tape for sequences of up to `capacity` tokens; with `recompute`, each layer's
    /// activations are recomputed from its input during the backward pass instead of kept
    /// (one more forward's work, a fraction of the memory). The model must have a LoRA or
    /// IA3 adapter attached: backpropagation trains those.
    pub fn tape(&self, capacity: u32, recompute: bool) -> Result<Tape<B>> {
        match self.adapter().map(|a| a.method.clone()) {
            Some(Method::Lora { .. } | Method::Ia3) => {}
            other => {
                return Err(Error::InvalidArgument {
                    name: "trainable",
                    reason: format!(
                        "backprop trains lora or ia3 adapters; the model has {}",
                        other.map_or("none".into(), |m| format!("{m:?}"))
                    ),
                });
            }
        }
        let c = &self.cfg;
        if capacity < 2 || capacity > c.context {
            return Err(Error::InvalidArgument {
                name: "tokens",
                reason: format!(
                    "a training sequence has 2 to {} tokens (the context), not {capacity}",
                    c.context
                ),
            });
        }
        let be: &B = &self.backend;
        let Sizes {
            t,
            dim,
            q,
            kv,
            ffn,
            widest,
            rank,
            chunk,
        } = self.sizes(capacity);
        let mut a = Alloc { be, bytes: 0 };
        let mut inputs = Vec::new();
        for _ in 0..c.n_layers {
            inputs.push(a.f32s(t * dim, "tape")?);
        }
        let mut layers = Vec::new();
        for _ in 0..if recompute { 1 } else { c.n_layers } {
            layers.push(Saved {
                qr: a.f32s(t * q, "tape")?,
                kr: a.f32s(t * kv, "tape")?,
                v: a.f32s(t * kv, "tape")?,
                att: a.f32s(t * q, "tape")?,
                x2: a.f32s(t * dim, "tape")?,
                gate: a.f32s(t * ffn, "tape")?,
                up: a.f32s(t * ffn, "tape")?,
            });
        }
        let last = a.f32s(t * dim, "tape")?;
        let low = [
            a.f32s(t * rank.max(1), "gradients")?,
            a.f32s(t * rank.max(1), "gradients")?,
            a.f32s(t * rank.max(1), "gradients")?,
            a.f32s(t * rank.max(1), "gradients")?,
        ];
        let temps = Temps {
            zeros: a.f32s(t * dim, "gradients")?,
            dres: a.f32s(t * dim, "gradients")?,
            dh: a.f32s(t * dim, "gradients")?,
            dx: a.f32s(t * widest, "gradients")?,
            datt: a.f32s(t * q, "gradients")?,
            dqr: a.f32s(t * q, "gradients")?,
            dq: a.f32s(t * q, "gradients")?,
            dkr: a.f32s(t * kv, "gradients")?,
            dk: a.f32s(t * kv, "gradients")?,
            dv: a.f32s(t * kv, "gradients")?,
            stats: a.f32s(t * u64::from(c.n_heads) * 2, "gradients")?,
            dact: a.f32s(t * ffn, "gradients")?,
            dgate: a.f32s(t * ffn, "gradients")?,
            dup: a.f32s(t * ffn, "gradients")?,
            input: a.f32s(t * widest, "gradients")?,
            pre: a.f32s(t * widest, "gradients")?,
            g: a.f32s(t * widest, "gradients")?,
            dinput: a.f32s(t * widest, "gradients")?,
            low,
            dparam: a.f32s(rank.max(1) * widest, "gradients")?,
            xs: a.f32s(chunk * dim, "gradients")?,
            normed: a.f32s(chunk * dim, "gradients")?,
            logits: a.f32s(chunk * u64::from(c.vocab), "logits")?,
            dlogits: a.f32s(chunk * u64::from(c.vocab), "logits")?,
            loss: a.f32s(chunk, "gradients")?,
            dnormed: a.f32s(chunk * dim, "gradients")?,
        };
        let table = rope_table(c.rope_theta, c.head_dim, capacity, &c.rope_scaling);
        let inv: Vec<f32> = table
            .chunks_exact(2)
            .flat_map(|cs| [cs[0], -cs[1]])
            .collect();
        a.bytes += 8 * t * u64::from(c.head_dim);
        let scratch = Scratch::new(
            be,
            c,
            capacity,
            Some(AdapterRoom::all(self.lora_rank().max(1))),
        )?;
        a.bytes += Scratch::<B>::bytes(c, t, rank.max(1));
        debug_assert_eq!(a.bytes, self.tape_bytes(capacity, recompute));
        Ok(Tape {
            capacity,
            inputs,
            recompute,
            rope: be.upload_f32(&table, "rope table")?,
            rope_inv: be.upload_f32(&inv, "rope table")?,
            layers,
            last,
            scratch,
            t: temps,
            bytes: a.bytes,
        })
    }

    /// A zeroed gradient buffer per tensor of [`Model::layout`], in that order.
    pub fn grad_buffers(&self) -> Result<Vec<B::Buffer>> {
        self.layout()
            .iter()
            .map(|p| self.backend.alloc(u64::from(p.len()) * 4, "gradients"))
            .collect()
    }

    /// One sequence forward and backward: adds d(scale * loss)/d(tensor) into `grads`
    /// (from [`Model::grad_buffers`]), where loss is the summed negative log-likelihood of
    /// the tokens `targets` marks (`targets[i]`: token i is predicted from those before it;
    /// `targets[0]` is ignored). Returns that sum (f64) and the number of targets.
    pub fn backward(
        &self,
        tape: &mut Tape<B>,
        tokens: &[u32],
        targets: &[bool],
        scale: f32,
        grads: &[B::Buffer],
    ) -> Result<(f64, usize)> {
        let c = &self.cfg;
        let be: &B = &self.backend;
        let n = tokens.len();
        if n < 2 || n > tape.capacity as usize || targets.len() != n {
            return Err(Error::InvalidArgument {
                name: "tokens",
                reason: format!(
                    "{n} tokens with {} target flags; a training sequence has 2 to {} tokens and a flag per token",
                    targets.len(),
                    tape.capacity
                ),
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id >= c.vocab) {
            return Err(Error::IndexOutOfRange {
                op: "backward: token id",
                index: u64::from(bad),
                bound: u64::from(c.vocab),
            });
        }
        if !scale.is_finite() {
            return Err(Error::InvalidArgument {
                name: "loss scale",
                reason: format!("{scale} is not finite"),
            });
        }
        let layout = self.layout();
        if grads.len() != layout.len()
            || grads
                .iter()
                .zip(layout)
                .any(|(g, p)| be.size(g) < u64::from(p.len()) * 4)
        {
            return Err(Error::InvalidArgument {
                name: "gradients",
                reason: format!(
                    "{} buffers for a layout of {} tensors, or one too small",
                    grads.len(),
                    layout.len()
                ),
            });
        }
        let t = n as u32;
        self.forward_tape(tape, tokens)?;
        let (total, count) = self.head_backward(tape, tokens, targets, scale)?;
        let lookup = self.linear_grads();
        for (i, layer) in self.layers.iter().enumerate().rev() {
            if tape.recompute {
                self.layer_forward(
                    layer,
                    &tape.bufs(i, 0, &tape.scratch.x),
                    &tape.scratch,
                    (&tape.rope, 0, &[t]),
                    None,
                    (LayerIn::Raw, None),
                )?;
            }
            let g = |target: Target| lookup[i * 7 + target as usize];
            let saved = &tape.layers[if tape.recompute { 0 } else { i }];
            self.layer_backward(layer, (&tape.inputs[i], saved), tape, t, grads, g)?;
        }
        Ok((total, count))
    }

    /// For each (layer, projection), its tensors' indices in the layout.
    fn linear_grads(&self) -> Vec<LinearGrads> {
        let mut out = vec![LinearGrads::default(); self.layers.len() * 7];
        for (i, p) in self.layout().iter().enumerate() {
            let (l, t) = match p.slot {
                Slot::LoraA(l, t) | Slot::LoraB(l, t) | Slot::Ia3(l, t) => (l, t),
                _ => continue,
            };
            if let Some(e) = out.get_mut(l as usize * 7 + t as usize) {
                match p.slot {
                    Slot::LoraA(..) => e.a = Some(i),
                    Slot::LoraB(..) => e.b = Some(i),
                    _ => e.scale = Some(i),
                }
            }
        }
        out
    }

    /// The forward pass over the whole sequence, each layer's activations kept.
    fn forward_tape(&self, tape: &Tape<B>, tokens: &[u32]) -> Result<()> {
        let be: &B = &self.backend;
        let c = &self.cfg;
        let t = tokens.len() as u32;
        let ids: Vec<u8> = tokens.iter().flat_map(|v| v.to_le_bytes()).collect();
        let ids = be.upload(&ids, "token ids")?;
        be.run(&Op::Embed {
            table: &self.embed.buf,
            ids: &ids,
            out: &tape.inputs[0],
            wtype: self.embed.wtype,
            vocab: c.vocab,
            dim: c.dim,
            n_ids: t,
        })?;
        for (i, layer) in self.layers.iter().enumerate() {
            let out = tape.inputs.get(i + 1).unwrap_or(&tape.last);
            let saved = if tape.recompute { 0 } else { i };
            let bufs = tape.bufs(i, saved, out);
            self.layer_forward(
                layer,
                &bufs,
                &tape.scratch,
                (&tape.rope, 0, &[t]),
                None,
                (LayerIn::Raw, None),
            )?;
        }
        Ok(())
    }

    /// The output head and the loss, HEAD_CHUNK rows at a time: writes d(scale * loss)/dx
    /// of the last layer's output into `tape.t.dres` and returns (summed loss, targets).
    fn head_backward(
        &self,
        tape: &Tape<B>,
        tokens: &[u32],
        targets: &[bool],
        scale: f32,
    ) -> Result<(f64, usize)> {
        let be: &B = &self.backend;
        let c = &self.cfg;
        let (dim, t) = (c.dim, tokens.len() as u32);
        let tt = &tape.t;
        // Rows without a target get no gradient: start from zero.
        be.run(&Op::Copy {
            src: &tt.zeros,
            dst: &tt.dres,
            n: t * dim,
            src_offset: 0,
            dst_offset: 0,
        })?;
        // Position i predicts token i + 1.
        let rows: Vec<u32> = (0..t - 1).filter(|&i| targets[i as usize + 1]).collect();
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let (mut total, mut count) = (0.0f64, 0usize);
        for chunk in rows.chunks(HEAD_CHUNK as usize) {
            let m = chunk.len() as u32;
            // Runs of consecutive rows move with one copy each, both ways.
            let runs = runs(chunk);
            for &(at, row, len) in &runs {
                be.run(&Op::Copy {
                    src: &tape.last,
                    dst: &tt.xs,
                    n: len * dim,
                    src_offset: row * dim,
                    dst_offset: at * dim,
                })?;
            }
            be.run(&Op::RmsNorm {
                x: &tt.xs,
                weight: &self.out_norm,
                out: &tt.normed,
                rows: m,
                dim,
                eps: c.rms_eps,
            })?;
            head.apply(be, &tt.normed, &tt.logits, m)?;
            let ids: Vec<u8> = chunk
                .iter()
                .flat_map(|&i| tokens[i as usize + 1].to_le_bytes())
                .collect();
            let ids = be.upload(&ids, "targets")?;
            be.run(&Op::CrossEntropy {
                logits: &tt.logits,
                targets: &ids,
                loss: &tt.loss,
                dlogits: &tt.dlogits,
                rows: m,
                vocab: c.vocab,
                scale,
            })?;
            be.run(&Op::QMatmulT {
                dy: &tt.dlogits,
                w: &head.buf,
                factors: head.scale_factors.as_ref(),
                dx: &tt.dnormed,
                wtype: head.wtype,
                m,
                k: dim,
                n: c.vocab,
            })?;
            be.run(&Op::RmsNormGrad {
                x: &tt.xs,
                weight: &self.out_norm,
                dy: &tt.dnormed,
                dx: &tt.normed,
                rows: m,
                dim,
                eps: c.rms_eps,
            })?;
            for &(at, row, len) in &runs {
                be.run(&Op::Copy {
                    src: &tt.normed,
                    dst: &tt.dres,
                    n: len * dim,
                    src_offset: at * dim,
                    dst_offset: row * dim,
                })?;
            }
            for v in be.read_f32(&tt.loss, m as usize)? {
                total += f64::from(v);
                count += 1;
            }
        }
        Ok((total, count))
    }

    /// Layer `layer`'s backward: `tape.t.dres` holds d/d(its output) and becomes d/d(its
    /// input); its projections' tensors' gradients are added into `grads`.
    fn layer_backward(
        &self,
        layer: &Layer<B>,
        (x, saved): (&B::Buffer, &Saved<B>),
        tape: &Tape<B>,
        t: u32,
        grads: &[B::Buffer],
        g: impl Fn(Target) -> LinearGrads,
    ) -> Result<()> {
        let be: &B = &self.backend;
        let c = &self.cfg;
        let (dim, hd) = (c.dim, c.head_dim);
        let s = &tape.scratch;
        let tt = &tape.t;
        let add = |x: &B::Buffer, y: &B::Buffer, n: u32| {
            be.run(&Op::Axpy {
                x,
                y,
                n,
                alpha: 1.0,
            })
        };
        let norm = |x: &B::Buffer, weight: &B::Buffer| {
            be.run(&Op::RmsNorm {
                x,
                weight,
                out: &s.h,
                rows: t,
                dim,
                eps: c.rms_eps,
            })
        };
        let norm_grad = |x: &B::Buffer, weight: &B::Buffer| -> Result<()> {
            be.run(&Op::RmsNormGrad {
                x,
                weight,
                dy: &tt.dh,
                dx: &tt.dx,
                rows: t,
                dim,
                eps: c.rms_eps,
            })?;
            add(&tt.dx, &tt.dres, t * dim)
        };
        let lin = |l: &Linear<B>, x: &B::Buffer, dy: &B::Buffer, dx: &B::Buffer, tg: Target| {
            self.linear_backward(l, x, dy, dx, t, tape, grads, g(tg))
        };
        // Feed-forward: out = x2 + down(silu(gate(h2)) * up(h2)), h2 = norm(x2).
        be.run(&Op::SwiGlu {
            gate: &saved.gate,
            up: &saved.up,
            out: &s.act,
            n: t * c.ffn_dim,
        })?;
        lin(&layer.down, &s.act, &tt.dres, &tt.dact, Target::Down)?;
        be.run(&Op::SwiGluGrad {
            gate: &saved.gate,
            up: &saved.up,
            dy: &tt.dact,
            dgate: &tt.dgate,
            dup: &tt.dup,
            n: t * c.ffn_dim,
        })?;
        norm(&saved.x2, &layer.ffn_norm)?;
        lin(&layer.gate, &s.h, &tt.dgate, &tt.dh, Target::Gate)?;
        lin(&layer.up, &s.h, &tt.dup, &tt.dx, Target::Up)?;
        add(&tt.dx, &tt.dh, t * dim)?;
        norm_grad(&saved.x2, &layer.ffn_norm)?;
        // Attention: x2 = x + o(attention(rope(q(h)), rope(k(h)), v(h))), h = norm(x).
        lin(&layer.o, &saved.att, &tt.dres, &tt.datt, Target::O)?;
        be.run(&Op::AttentionGrad {
            q: &saved.qr,
            k: &saved.kr,
            v: &saved.v,
            out: &saved.att,
            dout: &tt.datt,
            dq: &tt.dqr,
            dk: &tt.dkr,
            dv: &tt.dv,
            stats: &tt.stats,
            n_tokens: t,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: hd,
            scale: attention_scale(hd),
        })?;
        for (x, out, heads) in [
            (&tt.dqr, &tt.dq, c.n_heads),
            (&tt.dkr, &tt.dk, c.n_kv_heads),
        ] {
            be.run(&Op::Rope {
                x,
                table: &tape.rope_inv,
                out,
                n_tokens: t,
                n_heads: heads,
                head_dim: hd,
                pos0: 0,
                row0: 0,
                style: c.rope_style,
            })?;
        }
        norm(x, &layer.attn_norm)?;
        lin(&layer.q, &s.h, &tt.dq, &tt.dh, Target::Q)?;
        lin(&layer.k, &s.h, &tt.dk, &tt.dx, Target::K)?;
        add(&tt.dx, &tt.dh, t * dim)?;
        lin(&layer.v, &s.h, &tt.dv, &tt.dx, Target::V)?;
        add(&tt.dx, &tt.dh, t * dim)?;
        norm_grad(x, &layer.attn_norm)
    }

    /// One projection's backward: dx = d/d(x) given dy = d/d(out) (written, not added),
    /// and its adapter tensors' gradients added into `grads`. Mirrors
    /// [`Linear::forward`]: out = (W (x s_in) + bias + scale B A (x s_in)) s_out.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        l: &Linear<B>,
        x: &B::Buffer,
        dy: &B::Buffer,
        dx: &B::Buffer,
        m: u32,
        tape: &Tape<B>,
        grads: &[B::Buffer],
        lg: LinearGrads,
    ) -> Result<()> {
        let be: &B = &self.backend;
        let tt = &tape.t;
        let (rows, cols) = (l.weight.rows, l.weight.cols);
        let grad = |i: Option<usize>| i.and_then(|i| grads.get(i));
        let add = |x: &B::Buffer, y: &B::Buffer, n: u32| {
            be.run(&Op::Axpy {
                x,
                y,
                n,
                alpha: 1.0,
            })
        };
        let input = match &l.scale_in {
            Some(scale) => {
                be.run(&Op::MulCols {
                    x,
                    scale,
                    out: &tt.input,
                    rows: m,
                    cols,
                })?;
                &tt.input
            }
            None => x,
        };
        let dy = match &l.scale_out {
            Some(scale) => {
                l.forward_steps(be, input, &tt.pre, m, &tape.scratch, false)?;
                if let Some(gs) = grad(lg.scale) {
                    be.run(&Op::ColDot {
                        a: dy,
                        b: &tt.pre,
                        out: &tt.dparam,
                        rows: m,
                        cols: rows,
                    })?;
                    add(&tt.dparam, gs, rows)?;
                }
                be.run(&Op::MulCols {
                    x: dy,
                    scale,
                    out: &tt.g,
                    rows: m,
                    cols: rows,
                })?;
                &tt.g
            }
            None => dy,
        };
        let dinput = if l.scale_in.is_some() { &tt.dinput } else { dx };
        be.run(&Op::QMatmulT {
            dy,
            w: &l.weight.buf,
            factors: l.weight.scale_factors.as_ref(),
            dx: dinput,
            wtype: l.weight.wtype,
            m,
            k: cols,
            n: rows,
        })?;
        if let Some(lora) = &l.lora {
            let r = lora.rank;
            let [u, su, gb, sgb] = &tt.low;
            let matmul = |a, b, out, (mm, k, n), a_t, b_t| {
                be.run(&Op::Matmul {
                    a,
                    b,
                    out,
                    m: mm,
                    k,
                    n,
                    a_t,
                    b_t,
                })
            };
            let scale = |x, out, n| {
                be.run(&Op::Scale {
                    x,
                    out,
                    n,
                    alpha: lora.scale,
                })
            };
            // u = x A^T, then dB = dy^T (scale u).
            matmul(input, &lora.a, u, (m, cols, r), false, true)?;
            scale(u, su, m * r)?;
            if let Some(gbuf) = grad(lg.b) {
                matmul(dy, su, &tt.dparam, (rows, m, r), true, false)?;
                add(&tt.dparam, gbuf, rows * r)?;
            }
            // gb = scale dy B; dA = gb^T x; dx += gb A.
            matmul(dy, &lora.b, gb, (m, rows, r), false, false)?;
            scale(gb, sgb, m * r)?;
            if let Some(gbuf) = grad(lg.a) {
                matmul(sgb, input, &tt.dparam, (r, m, cols), true, false)?;
                add(&tt.dparam, gbuf, r * cols)?;
            }
            matmul(sgb, &lora.a, &tt.pre, (m, r, cols), false, false)?;
            add(&tt.pre, dinput, m * cols)?;
        }
        if let Some(scale) = &l.scale_in {
            if let Some(gs) = grad(lg.scale) {
                be.run(&Op::ColDot {
                    a: dinput,
                    b: x,
                    out: &tt.dparam,
                    rows: m,
                    cols,
                })?;
                add(&tt.dparam, gs, cols)?;
            }
            be.run(&Op::MulCols {
                x: dinput,
                scale,
                out: dx,
                rows: m,
                cols,
            })?;
        }
        Ok(())
    }
}
