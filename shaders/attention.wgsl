// Causal attention with grouped-query heads over a KV cache.
// q, out [rows, n_heads, head_dim]; k, v [capacity, n_kv_heads, head_dim]; the call's rows
// start at row0 of every buffer (a packed batch runs each sequence at its own rows).
// Token t (row row0 + t) sits at position pos0 + t and attends to positions 0 ..= pos0 + t
// (rows row0 ..= row0 + pos0 + t of k and v).
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
    row0: u32,
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
    let qo = ((p.row0 + t) * p.n_heads + h) * hd;
    var acc: array<f32, MAX_HEAD_DIM>;
    var mx = -3.0e38;
    var denom = 0.0;
    let last = p.pos0 + t;
    for (var pos = 0u; pos <= last; pos++) {
        let ko = ((p.row0 + pos) * p.n_kv_heads + kvh) * hd;
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

// head_dim % 4 == 0 and head_dim <= 128: the same computation with q and the accumulator
// in named vec4 registers (HD4 = head_dim / 4 as an override constant folds the unused
// ones away). The private array of `attention` lives in memory on CPU-emulated GPUs.
override HD4: u32 = 16u;

@group(0) @binding(5) var<storage, read> q4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> k4: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> v4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> out4: array<vec4<f32>>;

// Small workgroups (AT_WG) spread the few (token, head) pairs of a decode step over every
// core: CPU-emulated GPUs run one workgroup per thread.
override AT_WG: u32 = 64u;

@compute @workgroup_size(AT_WG, 1, 1)
fn attention_v4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * AT_WG;
    let t = idx / p.n_heads;
    let h = idx % p.n_heads;
    if t >= p.n_tokens {
        return;
    }
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let qo = ((p.row0 + t) * p.n_heads + h) * HD4;
    var qv0 = vec4<f32>(0.0);
    var acc0 = vec4<f32>(0.0);
    var qv1 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var qv2 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var qv3 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var qv4 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var qv5 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var qv6 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var qv7 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    var qv8 = vec4<f32>(0.0);
    var acc8 = vec4<f32>(0.0);
    var qv9 = vec4<f32>(0.0);
    var acc9 = vec4<f32>(0.0);
    var qv10 = vec4<f32>(0.0);
    var acc10 = vec4<f32>(0.0);
    var qv11 = vec4<f32>(0.0);
    var acc11 = vec4<f32>(0.0);
    var qv12 = vec4<f32>(0.0);
    var acc12 = vec4<f32>(0.0);
    var qv13 = vec4<f32>(0.0);
    var acc13 = vec4<f32>(0.0);
    var qv14 = vec4<f32>(0.0);
    var acc14 = vec4<f32>(0.0);
    var qv15 = vec4<f32>(0.0);
    var acc15 = vec4<f32>(0.0);
    var qv16 = vec4<f32>(0.0);
    var acc16 = vec4<f32>(0.0);
    var qv17 = vec4<f32>(0.0);
    var acc17 = vec4<f32>(0.0);
    var qv18 = vec4<f32>(0.0);
    var acc18 = vec4<f32>(0.0);
    var qv19 = vec4<f32>(0.0);
    var acc19 = vec4<f32>(0.0);
    var qv20 = vec4<f32>(0.0);
    var acc20 = vec4<f32>(0.0);
    var qv21 = vec4<f32>(0.0);
    var acc21 = vec4<f32>(0.0);
    var qv22 = vec4<f32>(0.0);
    var acc22 = vec4<f32>(0.0);
    var qv23 = vec4<f32>(0.0);
    var acc23 = vec4<f32>(0.0);
    var qv24 = vec4<f32>(0.0);
    var acc24 = vec4<f32>(0.0);
    var qv25 = vec4<f32>(0.0);
    var acc25 = vec4<f32>(0.0);
    var qv26 = vec4<f32>(0.0);
    var acc26 = vec4<f32>(0.0);
    var qv27 = vec4<f32>(0.0);
    var acc27 = vec4<f32>(0.0);
    var qv28 = vec4<f32>(0.0);
    var acc28 = vec4<f32>(0.0);
    var qv29 = vec4<f32>(0.0);
    var acc29 = vec4<f32>(0.0);
    var qv30 = vec4<f32>(0.0);
    var acc30 = vec4<f32>(0.0);
    var qv31 = vec4<f32>(0.0);
    var acc31 = vec4<f32>(0.0);
    if HD4 > 0u { qv0 = q4[qo + 0u]; }
    if HD4 > 1u { qv1 = q4[qo + 1u]; }
    if HD4 > 2u { qv2 = q4[qo + 2u]; }
    if HD4 > 3u { qv3 = q4[qo + 3u]; }
    if HD4 > 4u { qv4 = q4[qo + 4u]; }
    if HD4 > 5u { qv5 = q4[qo + 5u]; }
    if HD4 > 6u { qv6 = q4[qo + 6u]; }
    if HD4 > 7u { qv7 = q4[qo + 7u]; }
    if HD4 > 8u { qv8 = q4[qo + 8u]; }
    if HD4 > 9u { qv9 = q4[qo + 9u]; }
    if HD4 > 10u { qv10 = q4[qo + 10u]; }
    if HD4 > 11u { qv11 = q4[qo + 11u]; }
    if HD4 > 12u { qv12 = q4[qo + 12u]; }
    if HD4 > 13u { qv13 = q4[qo + 13u]; }
    if HD4 > 14u { qv14 = q4[qo + 14u]; }
    if HD4 > 15u { qv15 = q4[qo + 15u]; }
    if HD4 > 16u { qv16 = q4[qo + 16u]; }
    if HD4 > 17u { qv17 = q4[qo + 17u]; }
    if HD4 > 18u { qv18 = q4[qo + 18u]; }
    if HD4 > 19u { qv19 = q4[qo + 19u]; }
    if HD4 > 20u { qv20 = q4[qo + 20u]; }
    if HD4 > 21u { qv21 = q4[qo + 21u]; }
    if HD4 > 22u { qv22 = q4[qo + 22u]; }
    if HD4 > 23u { qv23 = q4[qo + 23u]; }
    if HD4 > 24u { qv24 = q4[qo + 24u]; }
    if HD4 > 25u { qv25 = q4[qo + 25u]; }
    if HD4 > 26u { qv26 = q4[qo + 26u]; }
    if HD4 > 27u { qv27 = q4[qo + 27u]; }
    if HD4 > 28u { qv28 = q4[qo + 28u]; }
    if HD4 > 29u { qv29 = q4[qo + 29u]; }
    if HD4 > 30u { qv30 = q4[qo + 30u]; }
    if HD4 > 31u { qv31 = q4[qo + 31u]; }
    var mx = -3.0e38;
    var denom = 0.0;
    let last = p.pos0 + t;
    for (var pos = 0u; pos <= last; pos++) {
        let ko = ((p.row0 + pos) * p.n_kv_heads + kvh) * HD4;
        var s = 0.0;
        if HD4 > 0u { s += dot(qv0, k4[ko + 0u]); }
        if HD4 > 1u { s += dot(qv1, k4[ko + 1u]); }
        if HD4 > 2u { s += dot(qv2, k4[ko + 2u]); }
        if HD4 > 3u { s += dot(qv3, k4[ko + 3u]); }
        if HD4 > 4u { s += dot(qv4, k4[ko + 4u]); }
        if HD4 > 5u { s += dot(qv5, k4[ko + 5u]); }
        if HD4 > 6u { s += dot(qv6, k4[ko + 6u]); }
        if HD4 > 7u { s += dot(qv7, k4[ko + 7u]); }
        if HD4 > 8u { s += dot(qv8, k4[ko + 8u]); }
        if HD4 > 9u { s += dot(qv9, k4[ko + 9u]); }
        if HD4 > 10u { s += dot(qv10, k4[ko + 10u]); }
        if HD4 > 11u { s += dot(qv11, k4[ko + 11u]); }
        if HD4 > 12u { s += dot(qv12, k4[ko + 12u]); }
        if HD4 > 13u { s += dot(qv13, k4[ko + 13u]); }
        if HD4 > 14u { s += dot(qv14, k4[ko + 14u]); }
        if HD4 > 15u { s += dot(qv15, k4[ko + 15u]); }
        if HD4 > 16u { s += dot(qv16, k4[ko + 16u]); }
        if HD4 > 17u { s += dot(qv17, k4[ko + 17u]); }
        if HD4 > 18u { s += dot(qv18, k4[ko + 18u]); }
        if HD4 > 19u { s += dot(qv19, k4[ko + 19u]); }
        if HD4 > 20u { s += dot(qv20, k4[ko + 20u]); }
        if HD4 > 21u { s += dot(qv21, k4[ko + 21u]); }
        if HD4 > 22u { s += dot(qv22, k4[ko + 22u]); }
        if HD4 > 23u { s += dot(qv23, k4[ko + 23u]); }
        if HD4 > 24u { s += dot(qv24, k4[ko + 24u]); }
        if HD4 > 25u { s += dot(qv25, k4[ko + 25u]); }
        if HD4 > 26u { s += dot(qv26, k4[ko + 26u]); }
        if HD4 > 27u { s += dot(qv27, k4[ko + 27u]); }
        if HD4 > 28u { s += dot(qv28, k4[ko + 28u]); }
        if HD4 > 29u { s += dot(qv29, k4[ko + 29u]); }
        if HD4 > 30u { s += dot(qv30, k4[ko + 30u]); }
        if HD4 > 31u { s += dot(qv31, k4[ko + 31u]); }
        s *= p.scale;
        let new_mx = max(mx, s);
        let correction = exp(mx - new_mx);
        let e = exp(s - new_mx);
        denom = denom * correction + e;
        if HD4 > 0u { acc0 = acc0 * correction + e * v4[ko + 0u]; }
        if HD4 > 1u { acc1 = acc1 * correction + e * v4[ko + 1u]; }
        if HD4 > 2u { acc2 = acc2 * correction + e * v4[ko + 2u]; }
        if HD4 > 3u { acc3 = acc3 * correction + e * v4[ko + 3u]; }
        if HD4 > 4u { acc4 = acc4 * correction + e * v4[ko + 4u]; }
        if HD4 > 5u { acc5 = acc5 * correction + e * v4[ko + 5u]; }
        if HD4 > 6u { acc6 = acc6 * correction + e * v4[ko + 6u]; }
        if HD4 > 7u { acc7 = acc7 * correction + e * v4[ko + 7u]; }
        if HD4 > 8u { acc8 = acc8 * correction + e * v4[ko + 8u]; }
        if HD4 > 9u { acc9 = acc9 * correction + e * v4[ko + 9u]; }
        if HD4 > 10u { acc10 = acc10 * correction + e * v4[ko + 10u]; }
        if HD4 > 11u { acc11 = acc11 * correction + e * v4[ko + 11u]; }
        if HD4 > 12u { acc12 = acc12 * correction + e * v4[ko + 12u]; }
        if HD4 > 13u { acc13 = acc13 * correction + e * v4[ko + 13u]; }
        if HD4 > 14u { acc14 = acc14 * correction + e * v4[ko + 14u]; }
        if HD4 > 15u { acc15 = acc15 * correction + e * v4[ko + 15u]; }
        if HD4 > 16u { acc16 = acc16 * correction + e * v4[ko + 16u]; }
        if HD4 > 17u { acc17 = acc17 * correction + e * v4[ko + 17u]; }
        if HD4 > 18u { acc18 = acc18 * correction + e * v4[ko + 18u]; }
        if HD4 > 19u { acc19 = acc19 * correction + e * v4[ko + 19u]; }
        if HD4 > 20u { acc20 = acc20 * correction + e * v4[ko + 20u]; }
        if HD4 > 21u { acc21 = acc21 * correction + e * v4[ko + 21u]; }
        if HD4 > 22u { acc22 = acc22 * correction + e * v4[ko + 22u]; }
        if HD4 > 23u { acc23 = acc23 * correction + e * v4[ko + 23u]; }
        if HD4 > 24u { acc24 = acc24 * correction + e * v4[ko + 24u]; }
        if HD4 > 25u { acc25 = acc25 * correction + e * v4[ko + 25u]; }
        if HD4 > 26u { acc26 = acc26 * correction + e * v4[ko + 26u]; }
        if HD4 > 27u { acc27 = acc27 * correction + e * v4[ko + 27u]; }
        if HD4 > 28u { acc28 = acc28 * correction + e * v4[ko + 28u]; }
        if HD4 > 29u { acc29 = acc29 * correction + e * v4[ko + 29u]; }
        if HD4 > 30u { acc30 = acc30 * correction + e * v4[ko + 30u]; }
        if HD4 > 31u { acc31 = acc31 * correction + e * v4[ko + 31u]; }
        mx = new_mx;
    }
    let inv = 1.0 / denom;
    if HD4 > 0u { out4[qo + 0u] = acc0 * inv; }
    if HD4 > 1u { out4[qo + 1u] = acc1 * inv; }
    if HD4 > 2u { out4[qo + 2u] = acc2 * inv; }
    if HD4 > 3u { out4[qo + 3u] = acc3 * inv; }
    if HD4 > 4u { out4[qo + 4u] = acc4 * inv; }
    if HD4 > 5u { out4[qo + 5u] = acc5 * inv; }
    if HD4 > 6u { out4[qo + 6u] = acc6 * inv; }
    if HD4 > 7u { out4[qo + 7u] = acc7 * inv; }
    if HD4 > 8u { out4[qo + 8u] = acc8 * inv; }
    if HD4 > 9u { out4[qo + 9u] = acc9 * inv; }
    if HD4 > 10u { out4[qo + 10u] = acc10 * inv; }
    if HD4 > 11u { out4[qo + 11u] = acc11 * inv; }
    if HD4 > 12u { out4[qo + 12u] = acc12 * inv; }
    if HD4 > 13u { out4[qo + 13u] = acc13 * inv; }
    if HD4 > 14u { out4[qo + 14u] = acc14 * inv; }
    if HD4 > 15u { out4[qo + 15u] = acc15 * inv; }
    if HD4 > 16u { out4[qo + 16u] = acc16 * inv; }
    if HD4 > 17u { out4[qo + 17u] = acc17 * inv; }
    if HD4 > 18u { out4[qo + 18u] = acc18 * inv; }
    if HD4 > 19u { out4[qo + 19u] = acc19 * inv; }
    if HD4 > 20u { out4[qo + 20u] = acc20 * inv; }
    if HD4 > 21u { out4[qo + 21u] = acc21 * inv; }
    if HD4 > 22u { out4[qo + 22u] = acc22 * inv; }
    if HD4 > 23u { out4[qo + 23u] = acc23 * inv; }
    if HD4 > 24u { out4[qo + 24u] = acc24 * inv; }
    if HD4 > 25u { out4[qo + 25u] = acc25 * inv; }
    if HD4 > 26u { out4[qo + 26u] = acc26 * inv; }
    if HD4 > 27u { out4[qo + 27u] = acc27 * inv; }
    if HD4 > 28u { out4[qo + 28u] = acc28 * inv; }
    if HD4 > 29u { out4[qo + 29u] = acc29 * inv; }
    if HD4 > 30u { out4[qo + 30u] = acc30 * inv; }
    if HD4 > 31u { out4[qo + 31u] = acc31 * inv; }
}

// A decode step has few (token, head) pairs, so one invocation each leaves most lanes idle.
// Here one workgroup of AT_SPLIT invocations (a power of two, at most 16) serves each pair:
// invocation i takes positions i, i + AT_SPLIT, ... with its own online softmax, and the
// partial maxima, sums and accumulators are merged in workgroup memory. Chosen per device
// by measurement (backend::tune) against `attention_v4`.
override AT_SPLIT: u32 = 16u;

var<workgroup> part_m: array<f32, 16>;
var<workgroup> part_s: array<f32, 16>;
var<workgroup> part_acc: array<vec4<f32>, 512>;

@compute @workgroup_size(AT_SPLIT, 1, 1)
fn attention_split(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = wid.x + wid.y * nwg.x;
    let t = idx / p.n_heads;
    let h = idx % p.n_heads;
    // Uniform per workgroup, so every invocation of a running workgroup reaches the barrier.
    if t >= p.n_tokens {
        return;
    }
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let qo = ((p.row0 + t) * p.n_heads + h) * HD4;
    var qv0 = vec4<f32>(0.0);
    var acc0 = vec4<f32>(0.0);
    var qv1 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var qv2 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var qv3 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var qv4 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var qv5 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var qv6 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var qv7 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    var qv8 = vec4<f32>(0.0);
    var acc8 = vec4<f32>(0.0);
    var qv9 = vec4<f32>(0.0);
    var acc9 = vec4<f32>(0.0);
    var qv10 = vec4<f32>(0.0);
    var acc10 = vec4<f32>(0.0);
    var qv11 = vec4<f32>(0.0);
    var acc11 = vec4<f32>(0.0);
    var qv12 = vec4<f32>(0.0);
    var acc12 = vec4<f32>(0.0);
    var qv13 = vec4<f32>(0.0);
    var acc13 = vec4<f32>(0.0);
    var qv14 = vec4<f32>(0.0);
    var acc14 = vec4<f32>(0.0);
    var qv15 = vec4<f32>(0.0);
    var acc15 = vec4<f32>(0.0);
    var qv16 = vec4<f32>(0.0);
    var acc16 = vec4<f32>(0.0);
    var qv17 = vec4<f32>(0.0);
    var acc17 = vec4<f32>(0.0);
    var qv18 = vec4<f32>(0.0);
    var acc18 = vec4<f32>(0.0);
    var qv19 = vec4<f32>(0.0);
    var acc19 = vec4<f32>(0.0);
    var qv20 = vec4<f32>(0.0);
    var acc20 = vec4<f32>(0.0);
    var qv21 = vec4<f32>(0.0);
    var acc21 = vec4<f32>(0.0);
    var qv22 = vec4<f32>(0.0);
    var acc22 = vec4<f32>(0.0);
    var qv23 = vec4<f32>(0.0);
    var acc23 = vec4<f32>(0.0);
    var qv24 = vec4<f32>(0.0);
    var acc24 = vec4<f32>(0.0);
    var qv25 = vec4<f32>(0.0);
    var acc25 = vec4<f32>(0.0);
    var qv26 = vec4<f32>(0.0);
    var acc26 = vec4<f32>(0.0);
    var qv27 = vec4<f32>(0.0);
    var acc27 = vec4<f32>(0.0);
    var qv28 = vec4<f32>(0.0);
    var acc28 = vec4<f32>(0.0);
    var qv29 = vec4<f32>(0.0);
    var acc29 = vec4<f32>(0.0);
    var qv30 = vec4<f32>(0.0);
    var acc30 = vec4<f32>(0.0);
    var qv31 = vec4<f32>(0.0);
    var acc31 = vec4<f32>(0.0);
    if HD4 > 0u { qv0 = q4[qo + 0u]; }
    if HD4 > 1u { qv1 = q4[qo + 1u]; }
    if HD4 > 2u { qv2 = q4[qo + 2u]; }
    if HD4 > 3u { qv3 = q4[qo + 3u]; }
    if HD4 > 4u { qv4 = q4[qo + 4u]; }
    if HD4 > 5u { qv5 = q4[qo + 5u]; }
    if HD4 > 6u { qv6 = q4[qo + 6u]; }
    if HD4 > 7u { qv7 = q4[qo + 7u]; }
    if HD4 > 8u { qv8 = q4[qo + 8u]; }
    if HD4 > 9u { qv9 = q4[qo + 9u]; }
    if HD4 > 10u { qv10 = q4[qo + 10u]; }
    if HD4 > 11u { qv11 = q4[qo + 11u]; }
    if HD4 > 12u { qv12 = q4[qo + 12u]; }
    if HD4 > 13u { qv13 = q4[qo + 13u]; }
    if HD4 > 14u { qv14 = q4[qo + 14u]; }
    if HD4 > 15u { qv15 = q4[qo + 15u]; }
    if HD4 > 16u { qv16 = q4[qo + 16u]; }
    if HD4 > 17u { qv17 = q4[qo + 17u]; }
    if HD4 > 18u { qv18 = q4[qo + 18u]; }
    if HD4 > 19u { qv19 = q4[qo + 19u]; }
    if HD4 > 20u { qv20 = q4[qo + 20u]; }
    if HD4 > 21u { qv21 = q4[qo + 21u]; }
    if HD4 > 22u { qv22 = q4[qo + 22u]; }
    if HD4 > 23u { qv23 = q4[qo + 23u]; }
    if HD4 > 24u { qv24 = q4[qo + 24u]; }
    if HD4 > 25u { qv25 = q4[qo + 25u]; }
    if HD4 > 26u { qv26 = q4[qo + 26u]; }
    if HD4 > 27u { qv27 = q4[qo + 27u]; }
    if HD4 > 28u { qv28 = q4[qo + 28u]; }
    if HD4 > 29u { qv29 = q4[qo + 29u]; }
    if HD4 > 30u { qv30 = q4[qo + 30u]; }
    if HD4 > 31u { qv31 = q4[qo + 31u]; }
    var mx = -3.0e38;
    var denom = 0.0;
    let last = p.pos0 + t;
    for (var pos = lid; pos <= last; pos += AT_SPLIT) {
        let ko = ((p.row0 + pos) * p.n_kv_heads + kvh) * HD4;
        var s = 0.0;
        if HD4 > 0u { s += dot(qv0, k4[ko + 0u]); }
        if HD4 > 1u { s += dot(qv1, k4[ko + 1u]); }
        if HD4 > 2u { s += dot(qv2, k4[ko + 2u]); }
        if HD4 > 3u { s += dot(qv3, k4[ko + 3u]); }
        if HD4 > 4u { s += dot(qv4, k4[ko + 4u]); }
        if HD4 > 5u { s += dot(qv5, k4[ko + 5u]); }
        if HD4 > 6u { s += dot(qv6, k4[ko + 6u]); }
        if HD4 > 7u { s += dot(qv7, k4[ko + 7u]); }
        if HD4 > 8u { s += dot(qv8, k4[ko + 8u]); }
        if HD4 > 9u { s += dot(qv9, k4[ko + 9u]); }
        if HD4 > 10u { s += dot(qv10, k4[ko + 10u]); }
        if HD4 > 11u { s += dot(qv11, k4[ko + 11u]); }
        if HD4 > 12u { s += dot(qv12, k4[ko + 12u]); }
        if HD4 > 13u { s += dot(qv13, k4[ko + 13u]); }
        if HD4 > 14u { s += dot(qv14, k4[ko + 14u]); }
        if HD4 > 15u { s += dot(qv15, k4[ko + 15u]); }
        if HD4 > 16u { s += dot(qv16, k4[ko + 16u]); }
        if HD4 > 17u { s += dot(qv17, k4[ko + 17u]); }
        if HD4 > 18u { s += dot(qv18, k4[ko + 18u]); }
        if HD4 > 19u { s += dot(qv19, k4[ko + 19u]); }
        if HD4 > 20u { s += dot(qv20, k4[ko + 20u]); }
        if HD4 > 21u { s += dot(qv21, k4[ko + 21u]); }
        if HD4 > 22u { s += dot(qv22, k4[ko + 22u]); }
        if HD4 > 23u { s += dot(qv23, k4[ko + 23u]); }
        if HD4 > 24u { s += dot(qv24, k4[ko + 24u]); }
        if HD4 > 25u { s += dot(qv25, k4[ko + 25u]); }
        if HD4 > 26u { s += dot(qv26, k4[ko + 26u]); }
        if HD4 > 27u { s += dot(qv27, k4[ko + 27u]); }
        if HD4 > 28u { s += dot(qv28, k4[ko + 28u]); }
        if HD4 > 29u { s += dot(qv29, k4[ko + 29u]); }
        if HD4 > 30u { s += dot(qv30, k4[ko + 30u]); }
        if HD4 > 31u { s += dot(qv31, k4[ko + 31u]); }
        s *= p.scale;
        let new_mx = max(mx, s);
        let correction = exp(mx - new_mx);
        let e = exp(s - new_mx);
        denom = denom * correction + e;
        if HD4 > 0u { acc0 = acc0 * correction + e * v4[ko + 0u]; }
        if HD4 > 1u { acc1 = acc1 * correction + e * v4[ko + 1u]; }
        if HD4 > 2u { acc2 = acc2 * correction + e * v4[ko + 2u]; }
        if HD4 > 3u { acc3 = acc3 * correction + e * v4[ko + 3u]; }
        if HD4 > 4u { acc4 = acc4 * correction + e * v4[ko + 4u]; }
        if HD4 > 5u { acc5 = acc5 * correction + e * v4[ko + 5u]; }
        if HD4 > 6u { acc6 = acc6 * correction + e * v4[ko + 6u]; }
        if HD4 > 7u { acc7 = acc7 * correction + e * v4[ko + 7u]; }
        if HD4 > 8u { acc8 = acc8 * correction + e * v4[ko + 8u]; }
        if HD4 > 9u { acc9 = acc9 * correction + e * v4[ko + 9u]; }
        if HD4 > 10u { acc10 = acc10 * correction + e * v4[ko + 10u]; }
        if HD4 > 11u { acc11 = acc11 * correction + e * v4[ko + 11u]; }
        if HD4 > 12u { acc12 = acc12 * correction + e * v4[ko + 12u]; }
        if HD4 > 13u { acc13 = acc13 * correction + e * v4[ko + 13u]; }
        if HD4 > 14u { acc14 = acc14 * correction + e * v4[ko + 14u]; }
        if HD4 > 15u { acc15 = acc15 * correction + e * v4[ko + 15u]; }
        if HD4 > 16u { acc16 = acc16 * correction + e * v4[ko + 16u]; }
        if HD4 > 17u { acc17 = acc17 * correction + e * v4[ko + 17u]; }
        if HD4 > 18u { acc18 = acc18 * correction + e * v4[ko + 18u]; }
        if HD4 > 19u { acc19 = acc19 * correction + e * v4[ko + 19u]; }
        if HD4 > 20u { acc20 = acc20 * correction + e * v4[ko + 20u]; }
        if HD4 > 21u { acc21 = acc21 * correction + e * v4[ko + 21u]; }
        if HD4 > 22u { acc22 = acc22 * correction + e * v4[ko + 22u]; }
        if HD4 > 23u { acc23 = acc23 * correction + e * v4[ko + 23u]; }
        if HD4 > 24u { acc24 = acc24 * correction + e * v4[ko + 24u]; }
        if HD4 > 25u { acc25 = acc25 * correction + e * v4[ko + 25u]; }
        if HD4 > 26u { acc26 = acc26 * correction + e * v4[ko + 26u]; }
        if HD4 > 27u { acc27 = acc27 * correction + e * v4[ko + 27u]; }
        if HD4 > 28u { acc28 = acc28 * correction + e * v4[ko + 28u]; }
        if HD4 > 29u { acc29 = acc29 * correction + e * v4[ko + 29u]; }
        if HD4 > 30u { acc30 = acc30 * correction + e * v4[ko + 30u]; }
        if HD4 > 31u { acc31 = acc31 * correction + e * v4[ko + 31u]; }
        mx = new_mx;
    }
    part_m[lid] = mx;
    part_s[lid] = denom;
    if HD4 > 0u { part_acc[lid * 32u + 0u] = acc0; }
    if HD4 > 1u { part_acc[lid * 32u + 1u] = acc1; }
    if HD4 > 2u { part_acc[lid * 32u + 2u] = acc2; }
    if HD4 > 3u { part_acc[lid * 32u + 3u] = acc3; }
    if HD4 > 4u { part_acc[lid * 32u + 4u] = acc4; }
    if HD4 > 5u { part_acc[lid * 32u + 5u] = acc5; }
    if HD4 > 6u { part_acc[lid * 32u + 6u] = acc6; }
    if HD4 > 7u { part_acc[lid * 32u + 7u] = acc7; }
    if HD4 > 8u { part_acc[lid * 32u + 8u] = acc8; }
    if HD4 > 9u { part_acc[lid * 32u + 9u] = acc9; }
    if HD4 > 10u { part_acc[lid * 32u + 10u] = acc10; }
    if HD4 > 11u { part_acc[lid * 32u + 11u] = acc11; }
    if HD4 > 12u { part_acc[lid * 32u + 12u] = acc12; }
    if HD4 > 13u { part_acc[lid * 32u + 13u] = acc13; }
    if HD4 > 14u { part_acc[lid * 32u + 14u] = acc14; }
    if HD4 > 15u { part_acc[lid * 32u + 15u] = acc15; }
    if HD4 > 16u { part_acc[lid * 32u + 16u] = acc16; }
    if HD4 > 17u { part_acc[lid * 32u + 17u] = acc17; }
    if HD4 > 18u { part_acc[lid * 32u + 18u] = acc18; }
    if HD4 > 19u { part_acc[lid * 32u + 19u] = acc19; }
    if HD4 > 20u { part_acc[lid * 32u + 20u] = acc20; }
    if HD4 > 21u { part_acc[lid * 32u + 21u] = acc21; }
    if HD4 > 22u { part_acc[lid * 32u + 22u] = acc22; }
    if HD4 > 23u { part_acc[lid * 32u + 23u] = acc23; }
    if HD4 > 24u { part_acc[lid * 32u + 24u] = acc24; }
    if HD4 > 25u { part_acc[lid * 32u + 25u] = acc25; }
    if HD4 > 26u { part_acc[lid * 32u + 26u] = acc26; }
    if HD4 > 27u { part_acc[lid * 32u + 27u] = acc27; }
    if HD4 > 28u { part_acc[lid * 32u + 28u] = acc28; }
    if HD4 > 29u { part_acc[lid * 32u + 29u] = acc29; }
    if HD4 > 30u { part_acc[lid * 32u + 30u] = acc30; }
    if HD4 > 31u { part_acc[lid * 32u + 31u] = acc31; }
    workgroupBarrier();
    if lid != 0u {
        return;
    }
    // Invocations without a position hold (-3e38, 0, 0) and weigh exp(-huge) = 0.
    var m = part_m[0];
    for (var j = 1u; j < AT_SPLIT; j++) {
        m = max(m, part_m[j]);
    }
    var total = 0.0;
    for (var j = 0u; j < AT_SPLIT; j++) {
        total += part_s[j] * exp(part_m[j] - m);
    }
    let inv = 1.0 / total;
    for (var i = 0u; i < HD4; i++) {
        var a = vec4<f32>(0.0);
        for (var j = 0u; j < AT_SPLIT; j++) {
            a += part_acc[j * 32u + i] * exp(part_m[j] - m);
        }
        out4[qo + i] = a * inv;
    }
}

// A decode step with grouped-query heads: one workgroup per (token, kv head) whose
// AT_SPLIT invocations split the positions as `attention_split` does, each invocation
// holding all GQA (= n_heads / n_kv_heads, 1 to 4) query heads of that kv head, so every
// key and value element is loaded once for all of them instead of once per query head
// (loads bound attention on CPU-emulated GPUs). The partial maxima, sums and accumulators
// are merged in workgroup memory one head at a time. Chosen per device by measurement
// (backend::tune).
override GQA: u32 = 1u;

var<workgroup> gq_m: array<f32, 64>;
var<workgroup> gq_s: array<f32, 64>;

@compute @workgroup_size(AT_SPLIT, 1, 1)
fn attention_gqa(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = wid.x + wid.y * nwg.x;
    let t = idx / p.n_kv_heads;
    let kvh = idx % p.n_kv_heads;
    // Uniform per workgroup, so every invocation of a running workgroup reaches the barriers.
    if t >= p.n_tokens {
        return;
    }
    // Query head kvh GQA + g sits at qo + g HD4.
    let qo = ((p.row0 + t) * p.n_heads + kvh * GQA) * HD4;
    var qA0 = vec4<f32>(0.0);
    var accA0 = vec4<f32>(0.0);
    var qA1 = vec4<f32>(0.0);
    var accA1 = vec4<f32>(0.0);
    var qA2 = vec4<f32>(0.0);
    var accA2 = vec4<f32>(0.0);
    var qA3 = vec4<f32>(0.0);
    var accA3 = vec4<f32>(0.0);
    var qA4 = vec4<f32>(0.0);
    var accA4 = vec4<f32>(0.0);
    var qA5 = vec4<f32>(0.0);
    var accA5 = vec4<f32>(0.0);
    var qA6 = vec4<f32>(0.0);
    var accA6 = vec4<f32>(0.0);
    var qA7 = vec4<f32>(0.0);
    var accA7 = vec4<f32>(0.0);
    var qA8 = vec4<f32>(0.0);
    var accA8 = vec4<f32>(0.0);
    var qA9 = vec4<f32>(0.0);
    var accA9 = vec4<f32>(0.0);
    var qA10 = vec4<f32>(0.0);
    var accA10 = vec4<f32>(0.0);
    var qA11 = vec4<f32>(0.0);
    var accA11 = vec4<f32>(0.0);
    var qA12 = vec4<f32>(0.0);
    var accA12 = vec4<f32>(0.0);
    var qA13 = vec4<f32>(0.0);
    var accA13 = vec4<f32>(0.0);
    var qA14 = vec4<f32>(0.0);
    var accA14 = vec4<f32>(0.0);
    var qA15 = vec4<f32>(0.0);
    var accA15 = vec4<f32>(0.0);
    var qA16 = vec4<f32>(0.0);
    var accA16 = vec4<f32>(0.0);
    var qA17 = vec4<f32>(0.0);
    var accA17 = vec4<f32>(0.0);
    var qA18 = vec4<f32>(0.0);
    var accA18 = vec4<f32>(0.0);
    var qA19 = vec4<f32>(0.0);
    var accA19 = vec4<f32>(0.0);
    var qA20 = vec4<f32>(0.0);
    var accA20 = vec4<f32>(0.0);
    var qA21 = vec4<f32>(0.0);
    var accA21 = vec4<f32>(0.0);
    var qA22 = vec4<f32>(0.0);
    var accA22 = vec4<f32>(0.0);
    var qA23 = vec4<f32>(0.0);
    var accA23 = vec4<f32>(0.0);
    var qA24 = vec4<f32>(0.0);
    var accA24 = vec4<f32>(0.0);
    var qA25 = vec4<f32>(0.0);
    var accA25 = vec4<f32>(0.0);
    var qA26 = vec4<f32>(0.0);
    var accA26 = vec4<f32>(0.0);
    var qA27 = vec4<f32>(0.0);
    var accA27 = vec4<f32>(0.0);
    var qA28 = vec4<f32>(0.0);
    var accA28 = vec4<f32>(0.0);
    var qA29 = vec4<f32>(0.0);
    var accA29 = vec4<f32>(0.0);
    var qA30 = vec4<f32>(0.0);
    var accA30 = vec4<f32>(0.0);
    var qA31 = vec4<f32>(0.0);
    var accA31 = vec4<f32>(0.0);
    var mA = -3.0e38;
    var sA = 0.0;
    var qB0 = vec4<f32>(0.0);
    var accB0 = vec4<f32>(0.0);
    var qB1 = vec4<f32>(0.0);
    var accB1 = vec4<f32>(0.0);
    var qB2 = vec4<f32>(0.0);
    var accB2 = vec4<f32>(0.0);
    var qB3 = vec4<f32>(0.0);
    var accB3 = vec4<f32>(0.0);
    var qB4 = vec4<f32>(0.0);
    var accB4 = vec4<f32>(0.0);
    var qB5 = vec4<f32>(0.0);
    var accB5 = vec4<f32>(0.0);
    var qB6 = vec4<f32>(0.0);
    var accB6 = vec4<f32>(0.0);
    var qB7 = vec4<f32>(0.0);
    var accB7 = vec4<f32>(0.0);
    var qB8 = vec4<f32>(0.0);
    var accB8 = vec4<f32>(0.0);
    var qB9 = vec4<f32>(0.0);
    var accB9 = vec4<f32>(0.0);
    var qB10 = vec4<f32>(0.0);
    var accB10 = vec4<f32>(0.0);
    var qB11 = vec4<f32>(0.0);
    var accB11 = vec4<f32>(0.0);
    var qB12 = vec4<f32>(0.0);
    var accB12 = vec4<f32>(0.0);
    var qB13 = vec4<f32>(0.0);
    var accB13 = vec4<f32>(0.0);
    var qB14 = vec4<f32>(0.0);
    var accB14 = vec4<f32>(0.0);
    var qB15 = vec4<f32>(0.0);
    var accB15 = vec4<f32>(0.0);
    var qB16 = vec4<f32>(0.0);
    var accB16 = vec4<f32>(0.0);
    var qB17 = vec4<f32>(0.0);
    var accB17 = vec4<f32>(0.0);
    var qB18 = vec4<f32>(0.0);
    var accB18 = vec4<f32>(0.0);
    var qB19 = vec4<f32>(0.0);
    var accB19 = vec4<f32>(0.0);
    var qB20 = vec4<f32>(0.0);
    var accB20 = vec4<f32>(0.0);
    var qB21 = vec4<f32>(0.0);
    var accB21 = vec4<f32>(0.0);
    var qB22 = vec4<f32>(0.0);
    var accB22 = vec4<f32>(0.0);
    var qB23 = vec4<f32>(0.0);
    var accB23 = vec4<f32>(0.0);
    var qB24 = vec4<f32>(0.0);
    var accB24 = vec4<f32>(0.0);
    var qB25 = vec4<f32>(0.0);
    var accB25 = vec4<f32>(0.0);
    var qB26 = vec4<f32>(0.0);
    var accB26 = vec4<f32>(0.0);
    var qB27 = vec4<f32>(0.0);
    var accB27 = vec4<f32>(0.0);
    var qB28 = vec4<f32>(0.0);
    var accB28 = vec4<f32>(0.0);
    var qB29 = vec4<f32>(0.0);
    var accB29 = vec4<f32>(0.0);
    var qB30 = vec4<f32>(0.0);
    var accB30 = vec4<f32>(0.0);
    var qB31 = vec4<f32>(0.0);
    var accB31 = vec4<f32>(0.0);
    var mB = -3.0e38;
    var sB = 0.0;
    var qC0 = vec4<f32>(0.0);
    var accC0 = vec4<f32>(0.0);
    var qC1 = vec4<f32>(0.0);
    var accC1 = vec4<f32>(0.0);
    var qC2 = vec4<f32>(0.0);
    var accC2 = vec4<f32>(0.0);
    var qC3 = vec4<f32>(0.0);
    var accC3 = vec4<f32>(0.0);
    var qC4 = vec4<f32>(0.0);
    var accC4 = vec4<f32>(0.0);
    var qC5 = vec4<f32>(0.0);
    var accC5 = vec4<f32>(0.0);
    var qC6 = vec4<f32>(0.0);
    var accC6 = vec4<f32>(0.0);
    var qC7 = vec4<f32>(0.0);
    var accC7 = vec4<f32>(0.0);
    var qC8 = vec4<f32>(0.0);
    var accC8 = vec4<f32>(0.0);
    var qC9 = vec4<f32>(0.0);
    var accC9 = vec4<f32>(0.0);
    var qC10 = vec4<f32>(0.0);
    var accC10 = vec4<f32>(0.0);
    var qC11 = vec4<f32>(0.0);
    var accC11 = vec4<f32>(0.0);
    var qC12 = vec4<f32>(0.0);
    var accC12 = vec4<f32>(0.0);
    var qC13 = vec4<f32>(0.0);
    var accC13 = vec4<f32>(0.0);
    var qC14 = vec4<f32>(0.0);
    var accC14 = vec4<f32>(0.0);
    var qC15 = vec4<f32>(0.0);
    var accC15 = vec4<f32>(0.0);
    var qC16 = vec4<f32>(0.0);
    var accC16 = vec4<f32>(0.0);
    var qC17 = vec4<f32>(0.0);
    var accC17 = vec4<f32>(0.0);
    var qC18 = vec4<f32>(0.0);
    var accC18 = vec4<f32>(0.0);
    var qC19 = vec4<f32>(0.0);
    var accC19 = vec4<f32>(0.0);
    var qC20 = vec4<f32>(0.0);
    var accC20 = vec4<f32>(0.0);
    var qC21 = vec4<f32>(0.0);
    var accC21 = vec4<f32>(0.0);
    var qC22 = vec4<f32>(0.0);
    var accC22 = vec4<f32>(0.0);
    var qC23 = vec4<f32>(0.0);
    var accC23 = vec4<f32>(0.0);
    var qC24 = vec4<f32>(0.0);
    var accC24 = vec4<f32>(0.0);
    var qC25 = vec4<f32>(0.0);
    var accC25 = vec4<f32>(0.0);
    var qC26 = vec4<f32>(0.0);
    var accC26 = vec4<f32>(0.0);
    var qC27 = vec4<f32>(0.0);
    var accC27 = vec4<f32>(0.0);
    var qC28 = vec4<f32>(0.0);
    var accC28 = vec4<f32>(0.0);
    var qC29 = vec4<f32>(0.0);
    var accC29 = vec4<f32>(0.0);
    var qC30 = vec4<f32>(0.0);
    var accC30 = vec4<f32>(0.0);
    var qC31 = vec4<f32>(0.0);
    var accC31 = vec4<f32>(0.0);
    var mC = -3.0e38;
    var sC = 0.0;
    var qD0 = vec4<f32>(0.0);
    var accD0 = vec4<f32>(0.0);
    var qD1 = vec4<f32>(0.0);
    var accD1 = vec4<f32>(0.0);
    var qD2 = vec4<f32>(0.0);
    var accD2 = vec4<f32>(0.0);
    var qD3 = vec4<f32>(0.0);
    var accD3 = vec4<f32>(0.0);
    var qD4 = vec4<f32>(0.0);
    var accD4 = vec4<f32>(0.0);
    var qD5 = vec4<f32>(0.0);
    var accD5 = vec4<f32>(0.0);
    var qD6 = vec4<f32>(0.0);
    var accD6 = vec4<f32>(0.0);
    var qD7 = vec4<f32>(0.0);
    var accD7 = vec4<f32>(0.0);
    var qD8 = vec4<f32>(0.0);
    var accD8 = vec4<f32>(0.0);
    var qD9 = vec4<f32>(0.0);
    var accD9 = vec4<f32>(0.0);
    var qD10 = vec4<f32>(0.0);
    var accD10 = vec4<f32>(0.0);
    var qD11 = vec4<f32>(0.0);
    var accD11 = vec4<f32>(0.0);
    var qD12 = vec4<f32>(0.0);
    var accD12 = vec4<f32>(0.0);
    var qD13 = vec4<f32>(0.0);
    var accD13 = vec4<f32>(0.0);
    var qD14 = vec4<f32>(0.0);
    var accD14 = vec4<f32>(0.0);
    var qD15 = vec4<f32>(0.0);
    var accD15 = vec4<f32>(0.0);
    var qD16 = vec4<f32>(0.0);
    var accD16 = vec4<f32>(0.0);
    var qD17 = vec4<f32>(0.0);
    var accD17 = vec4<f32>(0.0);
    var qD18 = vec4<f32>(0.0);
    var accD18 = vec4<f32>(0.0);
    var qD19 = vec4<f32>(0.0);
    var accD19 = vec4<f32>(0.0);
    var qD20 = vec4<f32>(0.0);
    var accD20 = vec4<f32>(0.0);
    var qD21 = vec4<f32>(0.0);
    var accD21 = vec4<f32>(0.0);
    var qD22 = vec4<f32>(0.0);
    var accD22 = vec4<f32>(0.0);
    var qD23 = vec4<f32>(0.0);
    var accD23 = vec4<f32>(0.0);
    var qD24 = vec4<f32>(0.0);
    var accD24 = vec4<f32>(0.0);
    var qD25 = vec4<f32>(0.0);
    var accD25 = vec4<f32>(0.0);
    var qD26 = vec4<f32>(0.0);
    var accD26 = vec4<f32>(0.0);
    var qD27 = vec4<f32>(0.0);
    var accD27 = vec4<f32>(0.0);
    var qD28 = vec4<f32>(0.0);
    var accD28 = vec4<f32>(0.0);
    var qD29 = vec4<f32>(0.0);
    var accD29 = vec4<f32>(0.0);
    var qD30 = vec4<f32>(0.0);
    var accD30 = vec4<f32>(0.0);
    var qD31 = vec4<f32>(0.0);
    var accD31 = vec4<f32>(0.0);
    var mD = -3.0e38;
    var sD = 0.0;
    if HD4 > 0u { qA0 = q4[qo + 0u * HD4 + 0u]; }
    if HD4 > 1u { qA1 = q4[qo + 0u * HD4 + 1u]; }
    if HD4 > 2u { qA2 = q4[qo + 0u * HD4 + 2u]; }
    if HD4 > 3u { qA3 = q4[qo + 0u * HD4 + 3u]; }
    if HD4 > 4u { qA4 = q4[qo + 0u * HD4 + 4u]; }
    if HD4 > 5u { qA5 = q4[qo + 0u * HD4 + 5u]; }
    if HD4 > 6u { qA6 = q4[qo + 0u * HD4 + 6u]; }
    if HD4 > 7u { qA7 = q4[qo + 0u * HD4 + 7u]; }
    if HD4 > 8u { qA8 = q4[qo + 0u * HD4 + 8u]; }
    if HD4 > 9u { qA9 = q4[qo + 0u * HD4 + 9u]; }
    if HD4 > 10u { qA10 = q4[qo + 0u * HD4 + 10u]; }
    if HD4 > 11u { qA11 = q4[qo + 0u * HD4 + 11u]; }
    if HD4 > 12u { qA12 = q4[qo + 0u * HD4 + 12u]; }
    if HD4 > 13u { qA13 = q4[qo + 0u * HD4 + 13u]; }
    if HD4 > 14u { qA14 = q4[qo + 0u * HD4 + 14u]; }
    if HD4 > 15u { qA15 = q4[qo + 0u * HD4 + 15u]; }
    if HD4 > 16u { qA16 = q4[qo + 0u * HD4 + 16u]; }
    if HD4 > 17u { qA17 = q4[qo + 0u * HD4 + 17u]; }
    if HD4 > 18u { qA18 = q4[qo + 0u * HD4 + 18u]; }
    if HD4 > 19u { qA19 = q4[qo + 0u * HD4 + 19u]; }
    if HD4 > 20u { qA20 = q4[qo + 0u * HD4 + 20u]; }
    if HD4 > 21u { qA21 = q4[qo + 0u * HD4 + 21u]; }
    if HD4 > 22u { qA22 = q4[qo + 0u * HD4 + 22u]; }
    if HD4 > 23u { qA23 = q4[qo + 0u * HD4 + 23u]; }
    if HD4 > 24u { qA24 = q4[qo + 0u * HD4 + 24u]; }
    if HD4 > 25u { qA25 = q4[qo + 0u * HD4 + 25u]; }
    if HD4 > 26u { qA26 = q4[qo + 0u * HD4 + 26u]; }
    if HD4 > 27u { qA27 = q4[qo + 0u * HD4 + 27u]; }
    if HD4 > 28u { qA28 = q4[qo + 0u * HD4 + 28u]; }
    if HD4 > 29u { qA29 = q4[qo + 0u * HD4 + 29u]; }
    if HD4 > 30u { qA30 = q4[qo + 0u * HD4 + 30u]; }
    if HD4 > 31u { qA31 = q4[qo + 0u * HD4 + 31u]; }
    if GQA > 1u && HD4 > 0u { qB0 = q4[qo + 1u * HD4 + 0u]; }
    if GQA > 1u && HD4 > 1u { qB1 = q4[qo + 1u * HD4 + 1u]; }
    if GQA > 1u && HD4 > 2u { qB2 = q4[qo + 1u * HD4 + 2u]; }
    if GQA > 1u && HD4 > 3u { qB3 = q4[qo + 1u * HD4 + 3u]; }
    if GQA > 1u && HD4 > 4u { qB4 = q4[qo + 1u * HD4 + 4u]; }
    if GQA > 1u && HD4 > 5u { qB5 = q4[qo + 1u * HD4 + 5u]; }
    if GQA > 1u && HD4 > 6u { qB6 = q4[qo + 1u * HD4 + 6u]; }
    if GQA > 1u && HD4 > 7u { qB7 = q4[qo + 1u * HD4 + 7u]; }
    if GQA > 1u && HD4 > 8u { qB8 = q4[qo + 1u * HD4 + 8u]; }
    if GQA > 1u && HD4 > 9u { qB9 = q4[qo + 1u * HD4 + 9u]; }
    if GQA > 1u && HD4 > 10u { qB10 = q4[qo + 1u * HD4 + 10u]; }
    if GQA > 1u && HD4 > 11u { qB11 = q4[qo + 1u * HD4 + 11u]; }
    if GQA > 1u && HD4 > 12u { qB12 = q4[qo + 1u * HD4 + 12u]; }
    if GQA > 1u && HD4 > 13u { qB13 = q4[qo + 1u * HD4 + 13u]; }
    if GQA > 1u && HD4 > 14u { qB14 = q4[qo + 1u * HD4 + 14u]; }
    if GQA > 1u && HD4 > 15u { qB15 = q4[qo + 1u * HD4 + 15u]; }
    if GQA > 1u && HD4 > 16u { qB16 = q4[qo + 1u * HD4 + 16u]; }
    if GQA > 1u && HD4 > 17u { qB17 = q4[qo + 1u * HD4 + 17u]; }
    if GQA > 1u && HD4 > 18u { qB18 = q4[qo + 1u * HD4 + 18u]; }
    if GQA > 1u && HD4 > 19u { qB19 = q4[qo + 1u * HD4 + 19u]; }
    if GQA > 1u && HD4 > 20u { qB20 = q4[qo + 1u * HD4 + 20u]; }
    if GQA > 1u && HD4 > 21u { qB21 = q4[qo + 1u * HD4 + 21u]; }
    if GQA > 1u && HD4 > 22u { qB22 = q4[qo + 1u * HD4 + 22u]; }
    if GQA > 1u && HD4 > 23u { qB23 = q4[qo + 1u * HD4 + 23u]; }
    if GQA > 1u && HD4 > 24u { qB24 = q4[qo + 1u * HD4 + 24u]; }
    if GQA > 1u && HD4 > 25u { qB25 = q4[qo + 1u * HD4 + 25u]; }
    if GQA > 1u && HD4 > 26u { qB26 = q4[qo + 1u * HD4 + 26u]; }
    if GQA > 1u && HD4 > 27u { qB27 = q4[qo + 1u * HD4 + 27u]; }
    if GQA > 1u && HD4 > 28u { qB28 = q4[qo + 1u * HD4 + 28u]; }
    if GQA > 1u && HD4 > 29u { qB29 = q4[qo + 1u * HD4 + 29u]; }
    if GQA > 1u && HD4 > 30u { qB30 = q4[qo + 1u * HD4 + 30u]; }
    if GQA > 1u && HD4 > 31u { qB31 = q4[qo + 1u * HD4 + 31u]; }
    if GQA > 2u && HD4 > 0u { qC0 = q4[qo + 2u * HD4 + 0u]; }
    if GQA > 2u && HD4 > 1u { qC1 = q4[qo + 2u * HD4 + 1u]; }
    if GQA > 2u && HD4 > 2u { qC2 = q4[qo + 2u * HD4 + 2u]; }
    if GQA > 2u && HD4 > 3u { qC3 = q4[qo + 2u * HD4 + 3u]; }
    if GQA > 2u && HD4 > 4u { qC4 = q4[qo + 2u * HD4 + 4u]; }
    if GQA > 2u && HD4 > 5u { qC5 = q4[qo + 2u * HD4 + 5u]; }
    if GQA > 2u && HD4 > 6u { qC6 = q4[qo + 2u * HD4 + 6u]; }
    if GQA > 2u && HD4 > 7u { qC7 = q4[qo + 2u * HD4 + 7u]; }
    if GQA > 2u && HD4 > 8u { qC8 = q4[qo + 2u * HD4 + 8u]; }
    if GQA > 2u && HD4 > 9u { qC9 = q4[qo + 2u * HD4 + 9u]; }
    if GQA > 2u && HD4 > 10u { qC10 = q4[qo + 2u * HD4 + 10u]; }
    if GQA > 2u && HD4 > 11u { qC11 = q4[qo + 2u * HD4 + 11u]; }
    if GQA > 2u && HD4 > 12u { qC12 = q4[qo + 2u * HD4 + 12u]; }
    if GQA > 2u && HD4 > 13u { qC13 = q4[qo + 2u * HD4 + 13u]; }
    if GQA > 2u && HD4 > 14u { qC14 = q4[qo + 2u * HD4 + 14u]; }
    if GQA > 2u && HD4 > 15u { qC15 = q4[qo + 2u * HD4 + 15u]; }
    if GQA > 2u && HD4 > 16u { qC16 = q4[qo + 2u * HD4 + 16u]; }
    if GQA > 2u && HD4 > 17u { qC17 = q4[qo + 2u * HD4 + 17u]; }
    if GQA > 2u && HD4 > 18u { qC18 = q4[qo + 2u * HD4 + 18u]; }
    if GQA > 2u && HD4 > 19u { qC19 = q4[qo + 2u * HD4 + 19u]; }
    if GQA > 2u && HD4 > 20u { qC20 = q4[qo + 2u * HD4 + 20u]; }
    if GQA > 2u && HD4 > 21u { qC21 = q4[qo + 2u * HD4 + 21u]; }
    if GQA > 2u && HD4 > 22u { qC22 = q4[qo + 2u * HD4 + 22u]; }
    if GQA > 2u && HD4 > 23u { qC23 = q4[qo + 2u * HD4 + 23u]; }
    if GQA > 2u && HD4 > 24u { qC24 = q4[qo + 2u * HD4 + 24u]; }
    if GQA > 2u && HD4 > 25u { qC25 = q4[qo + 2u * HD4 + 25u]; }
    if GQA > 2u && HD4 > 26u { qC26 = q4[qo + 2u * HD4 + 26u]; }
    if GQA > 2u && HD4 > 27u { qC27 = q4[qo + 2u * HD4 + 27u]; }
    if GQA > 2u && HD4 > 28u { qC28 = q4[qo + 2u * HD4 + 28u]; }
    if GQA > 2u && HD4 > 29u { qC29 = q4[qo + 2u * HD4 + 29u]; }
    if GQA > 2u && HD4 > 30u { qC30 = q4[qo + 2u * HD4 + 30u]; }
    if GQA > 2u && HD4 > 31u { qC31 = q4[qo + 2u * HD4 + 31u]; }
    if GQA > 3u && HD4 > 0u { qD0 = q4[qo + 3u * HD4 + 0u]; }
    if GQA > 3u && HD4 > 1u { qD1 = q4[qo + 3u * HD4 + 1u]; }
    if GQA > 3u && HD4 > 2u { qD2 = q4[qo + 3u * HD4 + 2u]; }
    if GQA > 3u && HD4 > 3u { qD3 = q4[qo + 3u * HD4 + 3u]; }
    if GQA > 3u && HD4 > 4u { qD4 = q4[qo + 3u * HD4 + 4u]; }
    if GQA > 3u && HD4 > 5u { qD5 = q4[qo + 3u * HD4 + 5u]; }
    if GQA > 3u && HD4 > 6u { qD6 = q4[qo + 3u * HD4 + 6u]; }
    if GQA > 3u && HD4 > 7u { qD7 = q4[qo + 3u * HD4 + 7u]; }
    if GQA > 3u && HD4 > 8u { qD8 = q4[qo + 3u * HD4 + 8u]; }
    if GQA > 3u && HD4 > 9u { qD9 = q4[qo + 3u * HD4 + 9u]; }
    if GQA > 3u && HD4 > 10u { qD10 = q4[qo + 3u * HD4 + 10u]; }
    if GQA > 3u && HD4 > 11u { qD11 = q4[qo + 3u * HD4 + 11u]; }
    if GQA > 3u && HD4 > 12u { qD12 = q4[qo + 3u * HD4 + 12u]; }
    if GQA > 3u && HD4 > 13u { qD13 = q4[qo + 3u * HD4 + 13u]; }
    if GQA > 3u && HD4 > 14u { qD14 = q4[qo + 3u * HD4 + 14u]; }
    if GQA > 3u && HD4 > 15u { qD15 = q4[qo + 3u * HD4 + 15u]; }
    if GQA > 3u && HD4 > 16u { qD16 = q4[qo + 3u * HD4 + 16u]; }
    if GQA > 3u && HD4 > 17u { qD17 = q4[qo + 3u * HD4 + 17u]; }
    if GQA > 3u && HD4 > 18u { qD18 = q4[qo + 3u * HD4 + 18u]; }
    if GQA > 3u && HD4 > 19u { qD19 = q4[qo + 3u * HD4 + 19u]; }
    if GQA > 3u && HD4 > 20u { qD20 = q4[qo + 3u * HD4 + 20u]; }
    if GQA > 3u && HD4 > 21u { qD21 = q4[qo + 3u * HD4 + 21u]; }
    if GQA > 3u && HD4 > 22u { qD22 = q4[qo + 3u * HD4 + 22u]; }
    if GQA > 3u && HD4 > 23u { qD23 = q4[qo + 3u * HD4 + 23u]; }
    if GQA > 3u && HD4 > 24u { qD24 = q4[qo + 3u * HD4 + 24u]; }
    if GQA > 3u && HD4 > 25u { qD25 = q4[qo + 3u * HD4 + 25u]; }
    if GQA > 3u && HD4 > 26u { qD26 = q4[qo + 3u * HD4 + 26u]; }
    if GQA > 3u && HD4 > 27u { qD27 = q4[qo + 3u * HD4 + 27u]; }
    if GQA > 3u && HD4 > 28u { qD28 = q4[qo + 3u * HD4 + 28u]; }
    if GQA > 3u && HD4 > 29u { qD29 = q4[qo + 3u * HD4 + 29u]; }
    if GQA > 3u && HD4 > 30u { qD30 = q4[qo + 3u * HD4 + 30u]; }
    if GQA > 3u && HD4 > 31u { qD31 = q4[qo + 3u * HD4 + 31u]; }
    let last = p.pos0 + t;
    for (var pos = lid; pos <= last; pos += AT_SPLIT) {
        let ko = ((p.row0 + pos) * p.n_kv_heads + kvh) * HD4;
        var dA = 0.0;
        var dB = 0.0;
        var dC = 0.0;
        var dD = 0.0;
        if HD4 > 0u { let kk = k4[ko + 0u]; dA += dot(qA0, kk); if GQA > 1u { dB += dot(qB0, kk); } if GQA > 2u { dC += dot(qC0, kk); } if GQA > 3u { dD += dot(qD0, kk); } }
        if HD4 > 1u { let kk = k4[ko + 1u]; dA += dot(qA1, kk); if GQA > 1u { dB += dot(qB1, kk); } if GQA > 2u { dC += dot(qC1, kk); } if GQA > 3u { dD += dot(qD1, kk); } }
        if HD4 > 2u { let kk = k4[ko + 2u]; dA += dot(qA2, kk); if GQA > 1u { dB += dot(qB2, kk); } if GQA > 2u { dC += dot(qC2, kk); } if GQA > 3u { dD += dot(qD2, kk); } }
        if HD4 > 3u { let kk = k4[ko + 3u]; dA += dot(qA3, kk); if GQA > 1u { dB += dot(qB3, kk); } if GQA > 2u { dC += dot(qC3, kk); } if GQA > 3u { dD += dot(qD3, kk); } }
        if HD4 > 4u { let kk = k4[ko + 4u]; dA += dot(qA4, kk); if GQA > 1u { dB += dot(qB4, kk); } if GQA > 2u { dC += dot(qC4, kk); } if GQA > 3u { dD += dot(qD4, kk); } }
        if HD4 > 5u { let kk = k4[ko + 5u]; dA += dot(qA5, kk); if GQA > 1u { dB += dot(qB5, kk); } if GQA > 2u { dC += dot(qC5, kk); } if GQA > 3u { dD += dot(qD5, kk); } }
        if HD4 > 6u { let kk = k4[ko + 6u]; dA += dot(qA6, kk); if GQA > 1u { dB += dot(qB6, kk); } if GQA > 2u { dC += dot(qC6, kk); } if GQA > 3u { dD += dot(qD6, kk); } }
        if HD4 > 7u { let kk = k4[ko + 7u]; dA += dot(qA7, kk); if GQA > 1u { dB += dot(qB7, kk); } if GQA > 2u { dC += dot(qC7, kk); } if GQA > 3u { dD += dot(qD7, kk); } }
        if HD4 > 8u { let kk = k4[ko + 8u]; dA += dot(qA8, kk); if GQA > 1u { dB += dot(qB8, kk); } if GQA > 2u { dC += dot(qC8, kk); } if GQA > 3u { dD += dot(qD8, kk); } }
        if HD4 > 9u { let kk = k4[ko + 9u]; dA += dot(qA9, kk); if GQA > 1u { dB += dot(qB9, kk); } if GQA > 2u { dC += dot(qC9, kk); } if GQA > 3u { dD += dot(qD9, kk); } }
        if HD4 > 10u { let kk = k4[ko + 10u]; dA += dot(qA10, kk); if GQA > 1u { dB += dot(qB10, kk); } if GQA > 2u { dC += dot(qC10, kk); } if GQA > 3u { dD += dot(qD10, kk); } }
        if HD4 > 11u { let kk = k4[ko + 11u]; dA += dot(qA11, kk); if GQA > 1u { dB += dot(qB11, kk); } if GQA > 2u { dC += dot(qC11, kk); } if GQA > 3u { dD += dot(qD11, kk); } }
        if HD4 > 12u { let kk = k4[ko + 12u]; dA += dot(qA12, kk); if GQA > 1u { dB += dot(qB12, kk); } if GQA > 2u { dC += dot(qC12, kk); } if GQA > 3u { dD += dot(qD12, kk); } }
        if HD4 > 13u { let kk = k4[ko + 13u]; dA += dot(qA13, kk); if GQA > 1u { dB += dot(qB13, kk); } if GQA > 2u { dC += dot(qC13, kk); } if GQA > 3u { dD += dot(qD13, kk); } }
        if HD4 > 14u { let kk = k4[ko + 14u]; dA += dot(qA14, kk); if GQA > 1u { dB += dot(qB14, kk); } if GQA > 2u { dC += dot(qC14, kk); } if GQA > 3u { dD += dot(qD14, kk); } }
        if HD4 > 15u { let kk = k4[ko + 15u]; dA += dot(qA15, kk); if GQA > 1u { dB += dot(qB15, kk); } if GQA > 2u { dC += dot(qC15, kk); } if GQA > 3u { dD += dot(qD15, kk); } }
        if HD4 > 16u { let kk = k4[ko + 16u]; dA += dot(qA16, kk); if GQA > 1u { dB += dot(qB16, kk); } if GQA > 2u { dC += dot(qC16, kk); } if GQA > 3u { dD += dot(qD16, kk); } }
        if HD4 > 17u { let kk = k4[ko + 17u]; dA += dot(qA17, kk); if GQA > 1u { dB += dot(qB17, kk); } if GQA > 2u { dC += dot(qC17, kk); } if GQA > 3u { dD += dot(qD17, kk); } }
        if HD4 > 18u { let kk = k4[ko + 18u]; dA += dot(qA18, kk); if GQA > 1u { dB += dot(qB18, kk); } if GQA > 2u { dC += dot(qC18, kk); } if GQA > 3u { dD += dot(qD18, kk); } }
        if HD4 > 19u { let kk = k4[ko + 19u]; dA += dot(qA19, kk); if GQA > 1u { dB += dot(qB19, kk); } if GQA > 2u { dC += dot(qC19, kk); } if GQA > 3u { dD += dot(qD19, kk); } }
        if HD4 > 20u { let kk = k4[ko + 20u]; dA += dot(qA20, kk); if GQA > 1u { dB += dot(qB20, kk); } if GQA > 2u { dC += dot(qC20, kk); } if GQA > 3u { dD += dot(qD20, kk); } }
        if HD4 > 21u { let kk = k4[ko + 21u]; dA += dot(qA21, kk); if GQA > 1u { dB += dot(qB21, kk); } if GQA > 2u { dC += dot(qC21, kk); } if GQA > 3u { dD += dot(qD21, kk); } }
        if HD4 > 22u { let kk = k4[ko + 22u]; dA += dot(qA22, kk); if GQA > 1u { dB += dot(qB22, kk); } if GQA > 2u { dC += dot(qC22, kk); } if GQA > 3u { dD += dot(qD22, kk); } }
        if HD4 > 23u { let kk = k4[ko + 23u]; dA += dot(qA23, kk); if GQA > 1u { dB += dot(qB23, kk); } if GQA > 2u { dC += dot(qC23, kk); } if GQA > 3u { dD += dot(qD23, kk); } }
        if HD4 > 24u { let kk = k4[ko + 24u]; dA += dot(qA24, kk); if GQA > 1u { dB += dot(qB24, kk); } if GQA > 2u { dC += dot(qC24, kk); } if GQA > 3u { dD += dot(qD24, kk); } }
        if HD4 > 25u { let kk = k4[ko + 25u]; dA += dot(qA25, kk); if GQA > 1u { dB += dot(qB25, kk); } if GQA > 2u { dC += dot(qC25, kk); } if GQA > 3u { dD += dot(qD25, kk); } }
        if HD4 > 26u { let kk = k4[ko + 26u]; dA += dot(qA26, kk); if GQA > 1u { dB += dot(qB26, kk); } if GQA > 2u { dC += dot(qC26, kk); } if GQA > 3u { dD += dot(qD26, kk); } }
        if HD4 > 27u { let kk = k4[ko + 27u]; dA += dot(qA27, kk); if GQA > 1u { dB += dot(qB27, kk); } if GQA > 2u { dC += dot(qC27, kk); } if GQA > 3u { dD += dot(qD27, kk); } }
        if HD4 > 28u { let kk = k4[ko + 28u]; dA += dot(qA28, kk); if GQA > 1u { dB += dot(qB28, kk); } if GQA > 2u { dC += dot(qC28, kk); } if GQA > 3u { dD += dot(qD28, kk); } }
        if HD4 > 29u { let kk = k4[ko + 29u]; dA += dot(qA29, kk); if GQA > 1u { dB += dot(qB29, kk); } if GQA > 2u { dC += dot(qC29, kk); } if GQA > 3u { dD += dot(qD29, kk); } }
        if HD4 > 30u { let kk = k4[ko + 30u]; dA += dot(qA30, kk); if GQA > 1u { dB += dot(qB30, kk); } if GQA > 2u { dC += dot(qC30, kk); } if GQA > 3u { dD += dot(qD30, kk); } }
        if HD4 > 31u { let kk = k4[ko + 31u]; dA += dot(qA31, kk); if GQA > 1u { dB += dot(qB31, kk); } if GQA > 2u { dC += dot(qC31, kk); } if GQA > 3u { dD += dot(qD31, kk); } }
        let nA = max(mA, dA * p.scale); let cA = exp(mA - nA); let eA = exp(dA * p.scale - nA); sA = sA * cA + eA; mA = nA;
        var cB = 0.0;
        var eB = 0.0;
        if GQA > 1u { let nB = max(mB, dB * p.scale); cB = exp(mB - nB); eB = exp(dB * p.scale - nB); sB = sB * cB + eB; mB = nB; }
        var cC = 0.0;
        var eC = 0.0;
        if GQA > 2u { let nC = max(mC, dC * p.scale); cC = exp(mC - nC); eC = exp(dC * p.scale - nC); sC = sC * cC + eC; mC = nC; }
        var cD = 0.0;
        var eD = 0.0;
        if GQA > 3u { let nD = max(mD, dD * p.scale); cD = exp(mD - nD); eD = exp(dD * p.scale - nD); sD = sD * cD + eD; mD = nD; }
        if HD4 > 0u { let vv = v4[ko + 0u]; accA0 = accA0 * cA + eA * vv; if GQA > 1u { accB0 = accB0 * cB + eB * vv; } if GQA > 2u { accC0 = accC0 * cC + eC * vv; } if GQA > 3u { accD0 = accD0 * cD + eD * vv; } }
        if HD4 > 1u { let vv = v4[ko + 1u]; accA1 = accA1 * cA + eA * vv; if GQA > 1u { accB1 = accB1 * cB + eB * vv; } if GQA > 2u { accC1 = accC1 * cC + eC * vv; } if GQA > 3u { accD1 = accD1 * cD + eD * vv; } }
        if HD4 > 2u { let vv = v4[ko + 2u]; accA2 = accA2 * cA + eA * vv; if GQA > 1u { accB2 = accB2 * cB + eB * vv; } if GQA > 2u { accC2 = accC2 * cC + eC * vv; } if GQA > 3u { accD2 = accD2 * cD + eD * vv; } }
        if HD4 > 3u { let vv = v4[ko + 3u]; accA3 = accA3 * cA + eA * vv; if GQA > 1u { accB3 = accB3 * cB + eB * vv; } if GQA > 2u { accC3 = accC3 * cC + eC * vv; } if GQA > 3u { accD3 = accD3 * cD + eD * vv; } }
        if HD4 > 4u { let vv = v4[ko + 4u]; accA4 = accA4 * cA + eA * vv; if GQA > 1u { accB4 = accB4 * cB + eB * vv; } if GQA > 2u { accC4 = accC4 * cC + eC * vv; } if GQA > 3u { accD4 = accD4 * cD + eD * vv; } }
        if HD4 > 5u { let vv = v4[ko + 5u]; accA5 = accA5 * cA + eA * vv; if GQA > 1u { accB5 = accB5 * cB + eB * vv; } if GQA > 2u { accC5 = accC5 * cC + eC * vv; } if GQA > 3u { accD5 = accD5 * cD + eD * vv; } }
        if HD4 > 6u { let vv = v4[ko + 6u]; accA6 = accA6 * cA + eA * vv; if GQA > 1u { accB6 = accB6 * cB + eB * vv; } if GQA > 2u { accC6 = accC6 * cC + eC * vv; } if GQA > 3u { accD6 = accD6 * cD + eD * vv; } }
        if HD4 > 7u { let vv = v4[ko + 7u]; accA7 = accA7 * cA + eA * vv; if GQA > 1u { accB7 = accB7 * cB + eB * vv; } if GQA > 2u { accC7 = accC7 * cC + eC * vv; } if GQA > 3u { accD7 = accD7 * cD + eD * vv; } }
        if HD4 > 8u { let vv = v4[ko + 8u]; accA8 = accA8 * cA + eA * vv; if GQA > 1u { accB8 = accB8 * cB + eB * vv; } if GQA > 2u { accC8 = accC8 * cC + eC * vv; } if GQA > 3u { accD8 = accD8 * cD + eD * vv; } }
        if HD4 > 9u { let vv = v4[ko + 9u]; accA9 = accA9 * cA + eA * vv; if GQA > 1u { accB9 = accB9 * cB + eB * vv; } if GQA > 2u { accC9 = accC9 * cC + eC * vv; } if GQA > 3u { accD9 = accD9 * cD + eD * vv; } }
        if HD4 > 10u { let vv = v4[ko + 10u]; accA10 = accA10 * cA + eA * vv; if GQA > 1u { accB10 = accB10 * cB + eB * vv; } if GQA > 2u { accC10 = accC10 * cC + eC * vv; } if GQA > 3u { accD10 = accD10 * cD + eD * vv; } }
        if HD4 > 11u { let vv = v4[ko + 11u]; accA11 = accA11 * cA + eA * vv; if GQA > 1u { accB11 = accB11 * cB + eB * vv; } if GQA > 2u { accC11 = accC11 * cC + eC * vv; } if GQA > 3u { accD11 = accD11 * cD + eD * vv; } }
        if HD4 > 12u { let vv = v4[ko + 12u]; accA12 = accA12 * cA + eA * vv; if GQA > 1u { accB12 = accB12 * cB + eB * vv; } if GQA > 2u { accC12 = accC12 * cC + eC * vv; } if GQA > 3u { accD12 = accD12 * cD + eD * vv; } }
        if HD4 > 13u { let vv = v4[ko + 13u]; accA13 = accA13 * cA + eA * vv; if GQA > 1u { accB13 = accB13 * cB + eB * vv; } if GQA > 2u { accC13 = accC13 * cC + eC * vv; } if GQA > 3u { accD13 = accD13 * cD + eD * vv; } }
        if HD4 > 14u { let vv = v4[ko + 14u]; accA14 = accA14 * cA + eA * vv; if GQA > 1u { accB14 = accB14 * cB + eB * vv; } if GQA > 2u { accC14 = accC14 * cC + eC * vv; } if GQA > 3u { accD14 = accD14 * cD + eD * vv; } }
        if HD4 > 15u { let vv = v4[ko + 15u]; accA15 = accA15 * cA + eA * vv; if GQA > 1u { accB15 = accB15 * cB + eB * vv; } if GQA > 2u { accC15 = accC15 * cC + eC * vv; } if GQA > 3u { accD15 = accD15 * cD + eD * vv; } }
        if HD4 > 16u { let vv = v4[ko + 16u]; accA16 = accA16 * cA + eA * vv; if GQA > 1u { accB16 = accB16 * cB + eB * vv; } if GQA > 2u { accC16 = accC16 * cC + eC * vv; } if GQA > 3u { accD16 = accD16 * cD + eD * vv; } }
        if HD4 > 17u { let vv = v4[ko + 17u]; accA17 = accA17 * cA + eA * vv; if GQA > 1u { accB17 = accB17 * cB + eB * vv; } if GQA > 2u { accC17 = accC17 * cC + eC * vv; } if GQA > 3u { accD17 = accD17 * cD + eD * vv; } }
        if HD4 > 18u { let vv = v4[ko + 18u]; accA18 = accA18 * cA + eA * vv; if GQA > 1u { accB18 = accB18 * cB + eB * vv; } if GQA > 2u { accC18 = accC18 * cC + eC * vv; } if GQA > 3u { accD18 = accD18 * cD + eD * vv; } }
        if HD4 > 19u { let vv = v4[ko + 19u]; accA19 = accA19 * cA + eA * vv; if GQA > 1u { accB19 = accB19 * cB + eB * vv; } if GQA > 2u { accC19 = accC19 * cC + eC * vv; } if GQA > 3u { accD19 = accD19 * cD + eD * vv; } }
        if HD4 > 20u { let vv = v4[ko + 20u]; accA20 = accA20 * cA + eA * vv; if GQA > 1u { accB20 = accB20 * cB + eB * vv; } if GQA > 2u { accC20 = accC20 * cC + eC * vv; } if GQA > 3u { accD20 = accD20 * cD + eD * vv; } }
        if HD4 > 21u { let vv = v4[ko + 21u]; accA21 = accA21 * cA + eA * vv; if GQA > 1u { accB21 = accB21 * cB + eB * vv; } if GQA > 2u { accC21 = accC21 * cC + eC * vv; } if GQA > 3u { accD21 = accD21 * cD + eD * vv; } }
        if HD4 > 22u { let vv = v4[ko + 22u]; accA22 = accA22 * cA + eA * vv; if GQA > 1u { accB22 = accB22 * cB + eB * vv; } if GQA > 2u { accC22 = accC22 * cC + eC * vv; } if GQA > 3u { accD22 = accD22 * cD + eD * vv; } }
        if HD4 > 23u { let vv = v4[ko + 23u]; accA23 = accA23 * cA + eA * vv; if GQA > 1u { accB23 = accB23 * cB + eB * vv; } if GQA > 2u { accC23 = accC23 * cC + eC * vv; } if GQA > 3u { accD23 = accD23 * cD + eD * vv; } }
        if HD4 > 24u { let vv = v4[ko + 24u]; accA24 = accA24 * cA + eA * vv; if GQA > 1u { accB24 = accB24 * cB + eB * vv; } if GQA > 2u { accC24 = accC24 * cC + eC * vv; } if GQA > 3u { accD24 = accD24 * cD + eD * vv; } }
        if HD4 > 25u { let vv = v4[ko + 25u]; accA25 = accA25 * cA + eA * vv; if GQA > 1u { accB25 = accB25 * cB + eB * vv; } if GQA > 2u { accC25 = accC25 * cC + eC * vv; } if GQA > 3u { accD25 = accD25 * cD + eD * vv; } }
        if HD4 > 26u { let vv = v4[ko + 26u]; accA26 = accA26 * cA + eA * vv; if GQA > 1u { accB26 = accB26 * cB + eB * vv; } if GQA > 2u { accC26 = accC26 * cC + eC * vv; } if GQA > 3u { accD26 = accD26 * cD + eD * vv; } }
        if HD4 > 27u { let vv = v4[ko + 27u]; accA27 = accA27 * cA + eA * vv; if GQA > 1u { accB27 = accB27 * cB + eB * vv; } if GQA > 2u { accC27 = accC27 * cC + eC * vv; } if GQA > 3u { accD27 = accD27 * cD + eD * vv; } }
        if HD4 > 28u { let vv = v4[ko + 28u]; accA28 = accA28 * cA + eA * vv; if GQA > 1u { accB28 = accB28 * cB + eB * vv; } if GQA > 2u { accC28 = accC28 * cC + eC * vv; } if GQA > 3u { accD28 = accD28 * cD + eD * vv; } }
        if HD4 > 29u { let vv = v4[ko + 29u]; accA29 = accA29 * cA + eA * vv; if GQA > 1u { accB29 = accB29 * cB + eB * vv; } if GQA > 2u { accC29 = accC29 * cC + eC * vv; } if GQA > 3u { accD29 = accD29 * cD + eD * vv; } }
        if HD4 > 30u { let vv = v4[ko + 30u]; accA30 = accA30 * cA + eA * vv; if GQA > 1u { accB30 = accB30 * cB + eB * vv; } if GQA > 2u { accC30 = accC30 * cC + eC * vv; } if GQA > 3u { accD30 = accD30 * cD + eD * vv; } }
        if HD4 > 31u { let vv = v4[ko + 31u]; accA31 = accA31 * cA + eA * vv; if GQA > 1u { accB31 = accB31 * cB + eB * vv; } if GQA > 2u { accC31 = accC31 * cC + eC * vv; } if GQA > 3u { accD31 = accD31 * cD + eD * vv; } }
    }
    gq_m[0u * AT_SPLIT + lid] = mA;
    gq_s[0u * AT_SPLIT + lid] = sA;
    gq_m[1u * AT_SPLIT + lid] = mB;
    gq_s[1u * AT_SPLIT + lid] = sB;
    gq_m[2u * AT_SPLIT + lid] = mC;
    gq_s[2u * AT_SPLIT + lid] = sC;
    gq_m[3u * AT_SPLIT + lid] = mD;
    gq_s[3u * AT_SPLIT + lid] = sD;
    workgroupBarrier();
    if HD4 > 0u { part_acc[lid * 32u + 0u] = accA0; }
    if HD4 > 1u { part_acc[lid * 32u + 1u] = accA1; }
    if HD4 > 2u { part_acc[lid * 32u + 2u] = accA2; }
    if HD4 > 3u { part_acc[lid * 32u + 3u] = accA3; }
    if HD4 > 4u { part_acc[lid * 32u + 4u] = accA4; }
    if HD4 > 5u { part_acc[lid * 32u + 5u] = accA5; }
    if HD4 > 6u { part_acc[lid * 32u + 6u] = accA6; }
    if HD4 > 7u { part_acc[lid * 32u + 7u] = accA7; }
    if HD4 > 8u { part_acc[lid * 32u + 8u] = accA8; }
    if HD4 > 9u { part_acc[lid * 32u + 9u] = accA9; }
    if HD4 > 10u { part_acc[lid * 32u + 10u] = accA10; }
    if HD4 > 11u { part_acc[lid * 32u + 11u] = accA11; }
    if HD4 > 12u { part_acc[lid * 32u + 12u] = accA12; }
    if HD4 > 13u { part_acc[lid * 32u + 13u] = accA13; }
    if HD4 > 14u { part_acc[lid * 32u + 14u] = accA14; }
    if HD4 > 15u { part_acc[lid * 32u + 15u] = accA15; }
    if HD4 > 16u { part_acc[lid * 32u + 16u] = accA16; }
    if HD4 > 17u { part_acc[lid * 32u + 17u] = accA17; }
    if HD4 > 18u { part_acc[lid * 32u + 18u] = accA18; }
    if HD4 > 19u { part_acc[lid * 32u + 19u] = accA19; }
    if HD4 > 20u { part_acc[lid * 32u + 20u] = accA20; }
    if HD4 > 21u { part_acc[lid * 32u + 21u] = accA21; }
    if HD4 > 22u { part_acc[lid * 32u + 22u] = accA22; }
    if HD4 > 23u { part_acc[lid * 32u + 23u] = accA23; }
    if HD4 > 24u { part_acc[lid * 32u + 24u] = accA24; }
    if HD4 > 25u { part_acc[lid * 32u + 25u] = accA25; }
    if HD4 > 26u { part_acc[lid * 32u + 26u] = accA26; }
    if HD4 > 27u { part_acc[lid * 32u + 27u] = accA27; }
    if HD4 > 28u { part_acc[lid * 32u + 28u] = accA28; }
    if HD4 > 29u { part_acc[lid * 32u + 29u] = accA29; }
    if HD4 > 30u { part_acc[lid * 32u + 30u] = accA30; }
    if HD4 > 31u { part_acc[lid * 32u + 31u] = accA31; }
    workgroupBarrier();
    gqa_merge(lid, 0u, qo + 0u * HD4);
    if GQA > 1u {
        workgroupBarrier();
        if HD4 > 0u { part_acc[lid * 32u + 0u] = accB0; }
        if HD4 > 1u { part_acc[lid * 32u + 1u] = accB1; }
        if HD4 > 2u { part_acc[lid * 32u + 2u] = accB2; }
        if HD4 > 3u { part_acc[lid * 32u + 3u] = accB3; }
        if HD4 > 4u { part_acc[lid * 32u + 4u] = accB4; }
        if HD4 > 5u { part_acc[lid * 32u + 5u] = accB5; }
        if HD4 > 6u { part_acc[lid * 32u + 6u] = accB6; }
        if HD4 > 7u { part_acc[lid * 32u + 7u] = accB7; }
        if HD4 > 8u { part_acc[lid * 32u + 8u] = accB8; }
        if HD4 > 9u { part_acc[lid * 32u + 9u] = accB9; }
        if HD4 > 10u { part_acc[lid * 32u + 10u] = accB10; }
        if HD4 > 11u { part_acc[lid * 32u + 11u] = accB11; }
        if HD4 > 12u { part_acc[lid * 32u + 12u] = accB12; }
        if HD4 > 13u { part_acc[lid * 32u + 13u] = accB13; }
        if HD4 > 14u { part_acc[lid * 32u + 14u] = accB14; }
        if HD4 > 15u { part_acc[lid * 32u + 15u] = accB15; }
        if HD4 > 16u { part_acc[lid * 32u + 16u] = accB16; }
        if HD4 > 17u { part_acc[lid * 32u + 17u] = accB17; }
        if HD4 > 18u { part_acc[lid * 32u + 18u] = accB18; }
        if HD4 > 19u { part_acc[lid * 32u + 19u] = accB19; }
        if HD4 > 20u { part_acc[lid * 32u + 20u] = accB20; }
        if HD4 > 21u { part_acc[lid * 32u + 21u] = accB21; }
        if HD4 > 22u { part_acc[lid * 32u + 22u] = accB22; }
        if HD4 > 23u { part_acc[lid * 32u + 23u] = accB23; }
        if HD4 > 24u { part_acc[lid * 32u + 24u] = accB24; }
        if HD4 > 25u { part_acc[lid * 32u + 25u] = accB25; }
        if HD4 > 26u { part_acc[lid * 32u + 26u] = accB26; }
        if HD4 > 27u { part_acc[lid * 32u + 27u] = accB27; }
        if HD4 > 28u { part_acc[lid * 32u + 28u] = accB28; }
        if HD4 > 29u { part_acc[lid * 32u + 29u] = accB29; }
        if HD4 > 30u { part_acc[lid * 32u + 30u] = accB30; }
        if HD4 > 31u { part_acc[lid * 32u + 31u] = accB31; }
        workgroupBarrier();
        gqa_merge(lid, 1u, qo + 1u * HD4);
    }
    if GQA > 2u {
        workgroupBarrier();
        if HD4 > 0u { part_acc[lid * 32u + 0u] = accC0; }
        if HD4 > 1u { part_acc[lid * 32u + 1u] = accC1; }
        if HD4 > 2u { part_acc[lid * 32u + 2u] = accC2; }
        if HD4 > 3u { part_acc[lid * 32u + 3u] = accC3; }
        if HD4 > 4u { part_acc[lid * 32u + 4u] = accC4; }
        if HD4 > 5u { part_acc[lid * 32u + 5u] = accC5; }
        if HD4 > 6u { part_acc[lid * 32u + 6u] = accC6; }
        if HD4 > 7u { part_acc[lid * 32u + 7u] = accC7; }
        if HD4 > 8u { part_acc[lid * 32u + 8u] = accC8; }
        if HD4 > 9u { part_acc[lid * 32u + 9u] = accC9; }
        if HD4 > 10u { part_acc[lid * 32u + 10u] = accC10; }
        if HD4 > 11u { part_acc[lid * 32u + 11u] = accC11; }
        if HD4 > 12u { part_acc[lid * 32u + 12u] = accC12; }
        if HD4 > 13u { part_acc[lid * 32u + 13u] = accC13; }
        if HD4 > 14u { part_acc[lid * 32u + 14u] = accC14; }
        if HD4 > 15u { part_acc[lid * 32u + 15u] = accC15; }
        if HD4 > 16u { part_acc[lid * 32u + 16u] = accC16; }
        if HD4 > 17u { part_acc[lid * 32u + 17u] = accC17; }
        if HD4 > 18u { part_acc[lid * 32u + 18u] = accC18; }
        if HD4 > 19u { part_acc[lid * 32u + 19u] = accC19; }
        if HD4 > 20u { part_acc[lid * 32u + 20u] = accC20; }
        if HD4 > 21u { part_acc[lid * 32u + 21u] = accC21; }
        if HD4 > 22u { part_acc[lid * 32u + 22u] = accC22; }
        if HD4 > 23u { part_acc[lid * 32u + 23u] = accC23; }
        if HD4 > 24u { part_acc[lid * 32u + 24u] = accC24; }
        if HD4 > 25u { part_acc[lid * 32u + 25u] = accC25; }
        if HD4 > 26u { part_acc[lid * 32u + 26u] = accC26; }
        if HD4 > 27u { part_acc[lid * 32u + 27u] = accC27; }
        if HD4 > 28u { part_acc[lid * 32u + 28u] = accC28; }
        if HD4 > 29u { part_acc[lid * 32u + 29u] = accC29; }
        if HD4 > 30u { part_acc[lid * 32u + 30u] = accC30; }
        if HD4 > 31u { part_acc[lid * 32u + 31u] = accC31; }
        workgroupBarrier();
        gqa_merge(lid, 2u, qo + 2u * HD4);
    }
    if GQA > 3u {
        workgroupBarrier();
        if HD4 > 0u { part_acc[lid * 32u + 0u] = accD0; }
        if HD4 > 1u { part_acc[lid * 32u + 1u] = accD1; }
        if HD4 > 2u { part_acc[lid * 32u + 2u] = accD2; }
        if HD4 > 3u { part_acc[lid * 32u + 3u] = accD3; }
        if HD4 > 4u { part_acc[lid * 32u + 4u] = accD4; }
        if HD4 > 5u { part_acc[lid * 32u + 5u] = accD5; }
        if HD4 > 6u { part_acc[lid * 32u + 6u] = accD6; }
        if HD4 > 7u { part_acc[lid * 32u + 7u] = accD7; }
        if HD4 > 8u { part_acc[lid * 32u + 8u] = accD8; }
        if HD4 > 9u { part_acc[lid * 32u + 9u] = accD9; }
        if HD4 > 10u { part_acc[lid * 32u + 10u] = accD10; }
        if HD4 > 11u { part_acc[lid * 32u + 11u] = accD11; }
        if HD4 > 12u { part_acc[lid * 32u + 12u] = accD12; }
        if HD4 > 13u { part_acc[lid * 32u + 13u] = accD13; }
        if HD4 > 14u { part_acc[lid * 32u + 14u] = accD14; }
        if HD4 > 15u { part_acc[lid * 32u + 15u] = accD15; }
        if HD4 > 16u { part_acc[lid * 32u + 16u] = accD16; }
        if HD4 > 17u { part_acc[lid * 32u + 17u] = accD17; }
        if HD4 > 18u { part_acc[lid * 32u + 18u] = accD18; }
        if HD4 > 19u { part_acc[lid * 32u + 19u] = accD19; }
        if HD4 > 20u { part_acc[lid * 32u + 20u] = accD20; }
        if HD4 > 21u { part_acc[lid * 32u + 21u] = accD21; }
        if HD4 > 22u { part_acc[lid * 32u + 22u] = accD22; }
        if HD4 > 23u { part_acc[lid * 32u + 23u] = accD23; }
        if HD4 > 24u { part_acc[lid * 32u + 24u] = accD24; }
        if HD4 > 25u { part_acc[lid * 32u + 25u] = accD25; }
        if HD4 > 26u { part_acc[lid * 32u + 26u] = accD26; }
        if HD4 > 27u { part_acc[lid * 32u + 27u] = accD27; }
        if HD4 > 28u { part_acc[lid * 32u + 28u] = accD28; }
        if HD4 > 29u { part_acc[lid * 32u + 29u] = accD29; }
        if HD4 > 30u { part_acc[lid * 32u + 30u] = accD30; }
        if HD4 > 31u { part_acc[lid * 32u + 31u] = accD31; }
        workgroupBarrier();
        gqa_merge(lid, 3u, qo + 3u * HD4);
    }
}

// Query head g's result from the AT_SPLIT partial results in gq_m, gq_s and part_acc, its
// vec4 chunks shared out among the invocations. Invocations without a position hold
// (-3e38, 0, 0) and weigh exp(-huge) = 0.
fn gqa_merge(lid: u32, g: u32, at: u32) {
    var m = gq_m[g * AT_SPLIT];
    for (var j = 1u; j < AT_SPLIT; j++) {
        m = max(m, gq_m[g * AT_SPLIT + j]);
    }
    var total = 0.0;
    for (var j = 0u; j < AT_SPLIT; j++) {
        total += gq_s[g * AT_SPLIT + j] * exp(gq_m[g * AT_SPLIT + j] - m);
    }
    for (var i = lid; i < HD4; i += AT_SPLIT) {
        var a = vec4<f32>(0.0);
        for (var j = 0u; j < AT_SPLIT; j++) {
            a += part_acc[j * 32u + i] * exp(gq_m[g * AT_SPLIT + j] - m);
        }
        out4[at + i] = a / total;
    }
}
