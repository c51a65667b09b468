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
