// The gradients of causal grouped-query attention over a sequence attending to itself
// (pos0 = 0), FlashAttention-2's way: probabilities are recomputed from q and k, never
// stored. q, out, dout, dq [n_tokens, n_heads, head_dim]; k, v, dk, dv [n_tokens,
// n_kv_heads, head_dim]; stats [n_tokens, n_heads, 2] = (log-sum-exp of the scaled scores,
// dout . out). CPU reference: runtime/src/backend/grad.rs `attention_grad`.
// Two passes: `attention_grad_q` (one invocation per (token, head)) writes dq and stats;
// `attention_grad_kv` (one per (position, kv head)) reads them and writes dk and dv, so
// no two invocations add into one value.

struct Params {
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// Matches `backend::MAX_HEAD_DIM`.
const MAX_HEAD_DIM: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> out: array<f32>;
@group(0) @binding(5) var<storage, read> dout: array<f32>;
@group(0) @binding(6) var<storage, read_write> dq: array<f32>;
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;
@group(0) @binding(9) var<storage, read_write> stats: array<f32>;
@group(0) @binding(10) var<storage, read> stats_in: array<f32>;

// q[a ..] . k[b ..] over head_dim.
fn dot_qk(a: u32, b: u32) -> f32 {
    var s = 0.0;
    for (var i = 0u; i < p.head_dim; i++) {
        s += q[a + i] * k[b + i];
    }
    return s;
}

@compute @workgroup_size(64, 1, 1)
fn attention_grad_q(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let t = idx / p.n_heads;
    let h = idx % p.n_heads;
    if t >= p.n_tokens {
        return;
    }
    let hd = p.head_dim;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let qo = (t * p.n_heads + h) * hd;
    // The maximum first, then the sum, as the reference's softmax does.
    var mx = -3.0e38;
    for (var pos = 0u; pos <= t; pos++) {
        mx = max(mx, p.scale * dot_qk(qo, (pos * p.n_kv_heads + kvh) * hd));
    }
    var sum = 0.0;
    for (var pos = 0u; pos <= t; pos++) {
        sum += exp(p.scale * dot_qk(qo, (pos * p.n_kv_heads + kvh) * hd) - mx);
    }
    var delta = 0.0;
    for (var i = 0u; i < hd; i++) {
        delta += dout[qo + i] * out[qo + i];
    }
    var acc: array<f32, MAX_HEAD_DIM>;
    for (var pos = 0u; pos <= t; pos++) {
        let ko = (pos * p.n_kv_heads + kvh) * hd;
        let pr = exp(p.scale * dot_qk(qo, ko) - mx) / sum;
        var dp = 0.0;
        for (var i = 0u; i < hd; i++) {
            dp += dout[qo + i] * v[ko + i];
        }
        let ds = pr * (dp - delta) * p.scale;
        for (var i = 0u; i < hd; i++) {
            acc[i] += ds * k[ko + i];
        }
    }
    for (var i = 0u; i < hd; i++) {
        dq[qo + i] = acc[i];
    }
    stats[2u * (t * p.n_heads + h)] = mx + log(sum);
    stats[2u * (t * p.n_heads + h) + 1u] = delta;
}

@compute @workgroup_size(64, 1, 1)
fn attention_grad_kv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let j = idx / p.n_kv_heads;
    let kvh = idx % p.n_kv_heads;
    if j >= p.n_tokens {
        return;
    }
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let ko = (j * p.n_kv_heads + kvh) * hd;
    var ak: array<f32, MAX_HEAD_DIM>;
    var av: array<f32, MAX_HEAD_DIM>;
    for (var t = j; t < p.n_tokens; t++) {
        for (var h = kvh * group; h < (kvh + 1u) * group; h++) {
            let qo = (t * p.n_heads + h) * hd;
            let st = 2u * (t * p.n_heads + h);
            let pr = exp(p.scale * dot_qk(qo, ko) - stats_in[st]);
            var dp = 0.0;
            for (var i = 0u; i < hd; i++) {
                dp += dout[qo + i] * v[ko + i];
            }
            let ds = pr * (dp - stats_in[st + 1u]) * p.scale;
            for (var i = 0u; i < hd; i++) {
                ak[i] += ds * q[qo + i];
                av[i] += pr * dout[qo + i];
            }
        }
    }
    for (var i = 0u; i < hd; i++) {
        dk[ko + i] = ak[i];
        dv[ko + i] = av[i];
    }
}
