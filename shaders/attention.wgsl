// Causal attention with grouped-query heads over a KV cache.
// q, out [n_tokens, n_heads, head_dim]; k, v [capacity, n_kv_heads, head_dim].
// Token t sits at position pos0 + t and attends to positions 0 ..= pos0 + t.
// CPU reference: runtime/src/backend/cpu.rs `attention`.
// One invocation per (token, head) with an online softmax: one pass over the keys, the
// running maximum rescales the accumulator, no workgroup memory.

struct Params {
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos0: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

// Matches `backend::MAX_HEAD_DIM`.
const MAX_HEAD_DIM: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn attention(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let t = idx / p.n_heads;
    let h = idx % p.n_heads;
    if t >= p.n_tokens {
        return;
    }
    let hd = p.head_dim;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let qo = (t * p.n_heads + h) * hd;
    var acc: array<f32, MAX_HEAD_DIM>;
    var mx = -3.0e38;
    var denom = 0.0;
    let last = p.pos0 + t;
    for (var pos = 0u; pos <= last; pos++) {
        let ko = (pos * p.n_kv_heads + kvh) * hd;
        var s = 0.0;
        for (var i = 0u; i < hd; i++) {
            s += q[qo + i] * k[ko + i];
        }
        s *= p.scale;
        let new_mx = max(mx, s);
        let correction = exp(mx - new_mx);
        let e = exp(s - new_mx);
        denom = denom * correction + e;
        for (var i = 0u; i < hd; i++) {
            acc[i] = acc[i] * correction + e * v[ko + i];
        }
        mx = new_mx;
    }
    for (var i = 0u; i < hd; i++) {
        out[qo + i] = acc[i] / denom;
    }
}
