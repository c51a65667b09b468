// Attention for devices whose subgroups are 8 invocations: `attention_sg8` (prefill) here,
// the chunked decode step `attention_dsg8` and `attention_merge` below.
//
// Prefill attention sharing each key and value row across a subgroup of 8 invocations.
// The same computation as `attention_v4` in attention.wgsl (causal, grouped-query heads,
// online softmax, row0 / pos0 as there); CPU reference: runtime/src/backend/cpu.rs
// `attention`. Only used where the device has subgroups of exactly 8 invocations (lavapipe
// on AVX2 or AVX-512 hosts), chosen per device by measurement (backend::tune).
//
// Why: on a CPU-emulated GPU the 8 invocations of a subgroup are the lanes of one vector
// register, and a storage load whose address differs per lane runs as a loop over the
// lanes. In `attention_v4` every invocation loads the whole key and value row for each
// position; here the subgroup's invocations (8 tokens of one head, so one key-value head)
// each load an eighth of the row and hand the pieces to each other with
// `subgroupBroadcast`, a register shuffle: 8x fewer loads.
//
// A separate file because a module using subgroup operations fails validation on devices
// without them.

struct Params {
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos0: u32,
    scale: f32,
    row0: u32,
    chunks: u32,
}

// head_dim / 4: 8, 16, 24 or 32 (head_dim a multiple of 32, at most 128).
override HD4: u32 = 16u;
// Invocations per workgroup (a multiple of 8): tokens of one head.
override AT_WG: u32 = 32u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(5) var<storage, read> q4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> k4: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> v4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> out4: array<vec4<f32>>;

// Workgroup (x, h): tokens x * AT_WG .. of head h. Tokens past the call's are clamped to
// its last, computed and not stored, so every invocation reaches the subgroup operations.
@compute @workgroup_size(AT_WG, 1, 1)
fn attention_sg8(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let h = gid.y;
    let t = min(gid.x, p.n_tokens - 1u);
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
    // The subgroup's tokens all attend to positions 0 ..= its latest token's last.
    let end = subgroupMax(last);
    for (var pos = 0u; pos <= end; pos++) {
        let ko = ((p.row0 + pos) * p.n_kv_heads + kvh) * HD4;
        // This invocation's pieces of the rows: vec4s lane, lane + 8, ...
        var kp0 = vec4<f32>(0.0);
        var kp1 = vec4<f32>(0.0);
        var kp2 = vec4<f32>(0.0);
        var kp3 = vec4<f32>(0.0);
        var vp0 = vec4<f32>(0.0);
        var vp1 = vec4<f32>(0.0);
        var vp2 = vec4<f32>(0.0);
        var vp3 = vec4<f32>(0.0);
        if HD4 > 0u { kp0 = k4[ko + 0u + lane]; vp0 = v4[ko + 0u + lane]; }
        if HD4 > 8u { kp1 = k4[ko + 8u + lane]; vp1 = v4[ko + 8u + lane]; }
        if HD4 > 16u { kp2 = k4[ko + 16u + lane]; vp2 = v4[ko + 16u + lane]; }
        if HD4 > 24u { kp3 = k4[ko + 24u + lane]; vp3 = v4[ko + 24u + lane]; }
        var s = 0.0;
        if HD4 > 0u { s += dot(qv0, subgroupBroadcast(kp0, 0u)); }
        if HD4 > 1u { s += dot(qv1, subgroupBroadcast(kp0, 1u)); }
        if HD4 > 2u { s += dot(qv2, subgroupBroadcast(kp0, 2u)); }
        if HD4 > 3u { s += dot(qv3, subgroupBroadcast(kp0, 3u)); }
        if HD4 > 4u { s += dot(qv4, subgroupBroadcast(kp0, 4u)); }
        if HD4 > 5u { s += dot(qv5, subgroupBroadcast(kp0, 5u)); }
        if HD4 > 6u { s += dot(qv6, subgroupBroadcast(kp0, 6u)); }
        if HD4 > 7u { s += dot(qv7, subgroupBroadcast(kp0, 7u)); }
        if HD4 > 8u { s += dot(qv8, subgroupBroadcast(kp1, 0u)); }
        if HD4 > 9u { s += dot(qv9, subgroupBroadcast(kp1, 1u)); }
        if HD4 > 10u { s += dot(qv10, subgroupBroadcast(kp1, 2u)); }
        if HD4 > 11u { s += dot(qv11, subgroupBroadcast(kp1, 3u)); }
        if HD4 > 12u { s += dot(qv12, subgroupBroadcast(kp1, 4u)); }
        if HD4 > 13u { s += dot(qv13, subgroupBroadcast(kp1, 5u)); }
        if HD4 > 14u { s += dot(qv14, subgroupBroadcast(kp1, 6u)); }
        if HD4 > 15u { s += dot(qv15, subgroupBroadcast(kp1, 7u)); }
        if HD4 > 16u { s += dot(qv16, subgroupBroadcast(kp2, 0u)); }
        if HD4 > 17u { s += dot(qv17, subgroupBroadcast(kp2, 1u)); }
        if HD4 > 18u { s += dot(qv18, subgroupBroadcast(kp2, 2u)); }
        if HD4 > 19u { s += dot(qv19, subgroupBroadcast(kp2, 3u)); }
        if HD4 > 20u { s += dot(qv20, subgroupBroadcast(kp2, 4u)); }
        if HD4 > 21u { s += dot(qv21, subgroupBroadcast(kp2, 5u)); }
        if HD4 > 22u { s += dot(qv22, subgroupBroadcast(kp2, 6u)); }
        if HD4 > 23u { s += dot(qv23, subgroupBroadcast(kp2, 7u)); }
        if HD4 > 24u { s += dot(qv24, subgroupBroadcast(kp3, 0u)); }
        if HD4 > 25u { s += dot(qv25, subgroupBroadcast(kp3, 1u)); }
        if HD4 > 26u { s += dot(qv26, subgroupBroadcast(kp3, 2u)); }
        if HD4 > 27u { s += dot(qv27, subgroupBroadcast(kp3, 3u)); }
        if HD4 > 28u { s += dot(qv28, subgroupBroadcast(kp3, 4u)); }
        if HD4 > 29u { s += dot(qv29, subgroupBroadcast(kp3, 5u)); }
        if HD4 > 30u { s += dot(qv30, subgroupBroadcast(kp3, 6u)); }
        if HD4 > 31u { s += dot(qv31, subgroupBroadcast(kp3, 7u)); }
        s *= p.scale;
        // Positions past this token's last leave its softmax as it is.
        let live = pos <= last;
        let new_mx = select(mx, max(mx, s), live);
        let correction = exp(mx - new_mx);
        let e = select(0.0, exp(s - new_mx), live);
        denom = denom * correction + e;
        if HD4 > 0u { acc0 = acc0 * correction + e * subgroupBroadcast(vp0, 0u); }
        if HD4 > 1u { acc1 = acc1 * correction + e * subgroupBroadcast(vp0, 1u); }
        if HD4 > 2u { acc2 = acc2 * correction + e * subgroupBroadcast(vp0, 2u); }
        if HD4 > 3u { acc3 = acc3 * correction + e * subgroupBroadcast(vp0, 3u); }
        if HD4 > 4u { acc4 = acc4 * correction + e * subgroupBroadcast(vp0, 4u); }
        if HD4 > 5u { acc5 = acc5 * correction + e * subgroupBroadcast(vp0, 5u); }
        if HD4 > 6u { acc6 = acc6 * correction + e * subgroupBroadcast(vp0, 6u); }
        if HD4 > 7u { acc7 = acc7 * correction + e * subgroupBroadcast(vp0, 7u); }
        if HD4 > 8u { acc8 = acc8 * correction + e * subgroupBroadcast(vp1, 0u); }
        if HD4 > 9u { acc9 = acc9 * correction + e * subgroupBroadcast(vp1, 1u); }
        if HD4 > 10u { acc10 = acc10 * correction + e * subgroupBroadcast(vp1, 2u); }
        if HD4 > 11u { acc11 = acc11 * correction + e * subgroupBroadcast(vp1, 3u); }
        if HD4 > 12u { acc12 = acc12 * correction + e * subgroupBroadcast(vp1, 4u); }
        if HD4 > 13u { acc13 = acc13 * correction + e * subgroupBroadcast(vp1, 5u); }
        if HD4 > 14u { acc14 = acc14 * correction + e * subgroupBroadcast(vp1, 6u); }
        if HD4 > 15u { acc15 = acc15 * correction + e * subgroupBroadcast(vp1, 7u); }
        if HD4 > 16u { acc16 = acc16 * correction + e * subgroupBroadcast(vp2, 0u); }
        if HD4 > 17u { acc17 = acc17 * correction + e * subgroupBroadcast(vp2, 1u); }
        if HD4 > 18u { acc18 = acc18 * correction + e * subgroupBroadcast(vp2, 2u); }
        if HD4 > 19u { acc19 = acc19 * correction + e * subgroupBroadcast(vp2, 3u); }
        if HD4 > 20u { acc20 = acc20 * correction + e * subgroupBroadcast(vp2, 4u); }
        if HD4 > 21u { acc21 = acc21 * correction + e * subgroupBroadcast(vp2, 5u); }
        if HD4 > 22u { acc22 = acc22 * correction + e * subgroupBroadcast(vp2, 6u); }
        if HD4 > 23u { acc23 = acc23 * correction + e * subgroupBroadcast(vp2, 7u); }
        if HD4 > 24u { acc24 = acc24 * correction + e * subgroupBroadcast(vp3, 0u); }
        if HD4 > 25u { acc25 = acc25 * correction + e * subgroupBroadcast(vp3, 1u); }
        if HD4 > 26u { acc26 = acc26 * correction + e * subgroupBroadcast(vp3, 2u); }
        if HD4 > 27u { acc27 = acc27 * correction + e * subgroupBroadcast(vp3, 3u); }
        if HD4 > 28u { acc28 = acc28 * correction + e * subgroupBroadcast(vp3, 4u); }
        if HD4 > 29u { acc29 = acc29 * correction + e * subgroupBroadcast(vp3, 5u); }
        if HD4 > 30u { acc30 = acc30 * correction + e * subgroupBroadcast(vp3, 6u); }
        if HD4 > 31u { acc31 = acc31 * correction + e * subgroupBroadcast(vp3, 7u); }
        mx = new_mx;
    }
    if gid.x >= p.n_tokens {
        return;
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

// A decode step (a few tokens over a long KV cache), split over positions and merged:
// `attention_dsg8` gives each workgroup, one subgroup of 8 invocations, CHUNK positions of
// one (token, kv head) for all GQA query heads of that kv head; each invocation holds an
// eighth of every head's query and accumulator (DL vec4s), scores one position of every
// block of 8 against the whole query (gathered from the subgroup with `subgroupBroadcast`),
// and adds the block's weighted value rows to its eighth of the accumulators. It leaves
// each query head's unnormalised accumulator, running maximum and sum in `part`;
// `attention_merge` combines a head's chunks into `out`. A context of one chunk is written
// to `out` whole (a dispatch fewer: on lavapipe each costs more than the positions). With
// TEX the keys and values are read from textures holding the cache's rows (one row per
// position, backend::wgpu keeps them in step with the buffers) instead of the buffers.
//
// Why: the other decode kernels hold whole head rows per invocation (registers spill on
// hosts with 16 vector registers) and leave the threads idle when a model has fewer kv
// heads than the host has threads; and a texel fetch skips lavapipe's per-lane buffer
// loads (see shaders/quant_sg.wgsl).

// Query heads per kv head (1 to 4).
override GQA: u32 = 1u;
// Positions per workgroup.
override CHUNK: u32 = 64u;
// 1: keys and values from `kt` / `vt`.
override TEX: u32 = 0u;
// vec4s of a head row per invocation: head_dim / 32 (1 to 4).
override DL: u32 = HD4 / 8u;

// Per (token, query head, chunk): head_dim accumulator values, then the maximum and sum.
@group(0) @binding(9) var<storage, read_write> part: array<f32>;
@group(0) @binding(10) var kt: texture_2d<u32>;
@group(0) @binding(11) var vt: texture_2d<u32>;

// vec4 `col` of cache row `row` (n_kv_heads * HD4 vec4s a row) of the keys or the values.
fn kv_load(values: bool, row: u32, col: u32) -> vec4<f32> {
    if TEX == 1u {
        let at = vec2<u32>(col, row);
        if values {
            return bitcast<vec4<f32>>(textureLoad(vt, at, 0));
        }
        return bitcast<vec4<f32>>(textureLoad(kt, at, 0));
    }
    let i = row * p.n_kv_heads * HD4 + col;
    if values {
        return v4[i];
    }
    return k4[i];
}

// One query head's eighth in `attention_dsg8`: DL vec4s of its query and of its
// accumulator (named fields, not arrays: lavapipe keeps arrays indexed in loops in memory).
struct Head {
    q0: vec4<f32>,
    q1: vec4<f32>,
    q2: vec4<f32>,
    q3: vec4<f32>,
    a0: vec4<f32>,
    a1: vec4<f32>,
    a2: vec4<f32>,
    a3: vec4<f32>,
}

// The head whose eighth of the query starts at vec4 `qo`, before any position.
fn head_at(qo: u32) -> Head {
    var h: Head;
    h.q0 = q4[qo];
    if DL > 1u { h.q1 = q4[qo + 1u]; }
    if DL > 2u { h.q2 = q4[qo + 2u]; }
    if DL > 3u { h.q3 = q4[qo + 3u]; }
    return h;
}

// The GQA query heads of one kv head (those past GQA unused), with head g's running
// maximum in mx[g] and this invocation's part of its sum in sum[g].
struct Group {
    h0: Head,
    h1: Head,
    h2: Head,
    h3: Head,
    mx: vec4<f32>,
    sum: vec4<f32>,
}

// s plus each head's query vec4 (q0 .. q3, one per head) dotted with vec4 `col` of key row
// `row`.
fn qk(s: vec4<f32>, row: u32, col: u32, q0: vec4<f32>, q1: vec4<f32>, q2: vec4<f32>, q3: vec4<f32>) -> vec4<f32> {
    let k = kv_load(false, row, col);
    var r = s;
    r.x += dot(q0, k);
    if GQA > 1u { r.y += dot(q1, k); }
    if GQA > 2u { r.z += dot(q2, k); }
    if GQA > 3u { r.w += dot(q3, k); }
    return r;
}

// Every head's score against key row `row` (this invocation's own position), in component
// g: the whole row's dot product times `p.scale`, in one invocation, each query vec4 taken from the
// invocation holding it (vec4 f of invocation l's eighth is vec4 l * DL + f of the head,
// whose key vec4 is at c0 + l * DL + f). No reduction across the subgroup per position
// (on lavapipe each is a loop over the lanes).
fn scores(g: Group, row: u32, c0: u32) -> vec4<f32> {
    let a = g.h0;
    let b = g.h1;
    let c = g.h2;
    let d = g.h3;
    var s = vec4<f32>(0.0);
    s = qk(s, row, c0, subgroupBroadcast(a.q0, 0u), subgroupBroadcast(b.q0, 0u), subgroupBroadcast(c.q0, 0u), subgroupBroadcast(d.q0, 0u));
    s = qk(s, row, c0 + DL, subgroupBroadcast(a.q0, 1u), subgroupBroadcast(b.q0, 1u), subgroupBroadcast(c.q0, 1u), subgroupBroadcast(d.q0, 1u));
    s = qk(s, row, c0 + 2u * DL, subgroupBroadcast(a.q0, 2u), subgroupBroadcast(b.q0, 2u), subgroupBroadcast(c.q0, 2u), subgroupBroadcast(d.q0, 2u));
    s = qk(s, row, c0 + 3u * DL, subgroupBroadcast(a.q0, 3u), subgroupBroadcast(b.q0, 3u), subgroupBroadcast(c.q0, 3u), subgroupBroadcast(d.q0, 3u));
    s = qk(s, row, c0 + 4u * DL, subgroupBroadcast(a.q0, 4u), subgroupBroadcast(b.q0, 4u), subgroupBroadcast(c.q0, 4u), subgroupBroadcast(d.q0, 4u));
    s = qk(s, row, c0 + 5u * DL, subgroupBroadcast(a.q0, 5u), subgroupBroadcast(b.q0, 5u), subgroupBroadcast(c.q0, 5u), subgroupBroadcast(d.q0, 5u));
    s = qk(s, row, c0 + 6u * DL, subgroupBroadcast(a.q0, 6u), subgroupBroadcast(b.q0, 6u), subgroupBroadcast(c.q0, 6u), subgroupBroadcast(d.q0, 6u));
    s = qk(s, row, c0 + 7u * DL, subgroupBroadcast(a.q0, 7u), subgroupBroadcast(b.q0, 7u), subgroupBroadcast(c.q0, 7u), subgroupBroadcast(d.q0, 7u));
    if DL > 1u {
        s = qk(s, row, c0 + 1u, subgroupBroadcast(a.q1, 0u), subgroupBroadcast(b.q1, 0u), subgroupBroadcast(c.q1, 0u), subgroupBroadcast(d.q1, 0u));
        s = qk(s, row, c0 + DL + 1u, subgroupBroadcast(a.q1, 1u), subgroupBroadcast(b.q1, 1u), subgroupBroadcast(c.q1, 1u), subgroupBroadcast(d.q1, 1u));
        s = qk(s, row, c0 + 2u * DL + 1u, subgroupBroadcast(a.q1, 2u), subgroupBroadcast(b.q1, 2u), subgroupBroadcast(c.q1, 2u), subgroupBroadcast(d.q1, 2u));
        s = qk(s, row, c0 + 3u * DL + 1u, subgroupBroadcast(a.q1, 3u), subgroupBroadcast(b.q1, 3u), subgroupBroadcast(c.q1, 3u), subgroupBroadcast(d.q1, 3u));
        s = qk(s, row, c0 + 4u * DL + 1u, subgroupBroadcast(a.q1, 4u), subgroupBroadcast(b.q1, 4u), subgroupBroadcast(c.q1, 4u), subgroupBroadcast(d.q1, 4u));
        s = qk(s, row, c0 + 5u * DL + 1u, subgroupBroadcast(a.q1, 5u), subgroupBroadcast(b.q1, 5u), subgroupBroadcast(c.q1, 5u), subgroupBroadcast(d.q1, 5u));
        s = qk(s, row, c0 + 6u * DL + 1u, subgroupBroadcast(a.q1, 6u), subgroupBroadcast(b.q1, 6u), subgroupBroadcast(c.q1, 6u), subgroupBroadcast(d.q1, 6u));
        s = qk(s, row, c0 + 7u * DL + 1u, subgroupBroadcast(a.q1, 7u), subgroupBroadcast(b.q1, 7u), subgroupBroadcast(c.q1, 7u), subgroupBroadcast(d.q1, 7u));
    }
    if DL > 2u {
        s = qk(s, row, c0 + 2u, subgroupBroadcast(a.q2, 0u), subgroupBroadcast(b.q2, 0u), subgroupBroadcast(c.q2, 0u), subgroupBroadcast(d.q2, 0u));
        s = qk(s, row, c0 + DL + 2u, subgroupBroadcast(a.q2, 1u), subgroupBroadcast(b.q2, 1u), subgroupBroadcast(c.q2, 1u), subgroupBroadcast(d.q2, 1u));
        s = qk(s, row, c0 + 2u * DL + 2u, subgroupBroadcast(a.q2, 2u), subgroupBroadcast(b.q2, 2u), subgroupBroadcast(c.q2, 2u), subgroupBroadcast(d.q2, 2u));
        s = qk(s, row, c0 + 3u * DL + 2u, subgroupBroadcast(a.q2, 3u), subgroupBroadcast(b.q2, 3u), subgroupBroadcast(c.q2, 3u), subgroupBroadcast(d.q2, 3u));
        s = qk(s, row, c0 + 4u * DL + 2u, subgroupBroadcast(a.q2, 4u), subgroupBroadcast(b.q2, 4u), subgroupBroadcast(c.q2, 4u), subgroupBroadcast(d.q2, 4u));
        s = qk(s, row, c0 + 5u * DL + 2u, subgroupBroadcast(a.q2, 5u), subgroupBroadcast(b.q2, 5u), subgroupBroadcast(c.q2, 5u), subgroupBroadcast(d.q2, 5u));
        s = qk(s, row, c0 + 6u * DL + 2u, subgroupBroadcast(a.q2, 6u), subgroupBroadcast(b.q2, 6u), subgroupBroadcast(c.q2, 6u), subgroupBroadcast(d.q2, 6u));
        s = qk(s, row, c0 + 7u * DL + 2u, subgroupBroadcast(a.q2, 7u), subgroupBroadcast(b.q2, 7u), subgroupBroadcast(c.q2, 7u), subgroupBroadcast(d.q2, 7u));
    }
    if DL > 3u {
        s = qk(s, row, c0 + 3u, subgroupBroadcast(a.q3, 0u), subgroupBroadcast(b.q3, 0u), subgroupBroadcast(c.q3, 0u), subgroupBroadcast(d.q3, 0u));
        s = qk(s, row, c0 + DL + 3u, subgroupBroadcast(a.q3, 1u), subgroupBroadcast(b.q3, 1u), subgroupBroadcast(c.q3, 1u), subgroupBroadcast(d.q3, 1u));
        s = qk(s, row, c0 + 2u * DL + 3u, subgroupBroadcast(a.q3, 2u), subgroupBroadcast(b.q3, 2u), subgroupBroadcast(c.q3, 2u), subgroupBroadcast(d.q3, 2u));
        s = qk(s, row, c0 + 3u * DL + 3u, subgroupBroadcast(a.q3, 3u), subgroupBroadcast(b.q3, 3u), subgroupBroadcast(c.q3, 3u), subgroupBroadcast(d.q3, 3u));
        s = qk(s, row, c0 + 4u * DL + 3u, subgroupBroadcast(a.q3, 4u), subgroupBroadcast(b.q3, 4u), subgroupBroadcast(c.q3, 4u), subgroupBroadcast(d.q3, 4u));
        s = qk(s, row, c0 + 5u * DL + 3u, subgroupBroadcast(a.q3, 5u), subgroupBroadcast(b.q3, 5u), subgroupBroadcast(c.q3, 5u), subgroupBroadcast(d.q3, 5u));
        s = qk(s, row, c0 + 6u * DL + 3u, subgroupBroadcast(a.q3, 6u), subgroupBroadcast(b.q3, 6u), subgroupBroadcast(c.q3, 6u), subgroupBroadcast(d.q3, 6u));
        s = qk(s, row, c0 + 7u * DL + 3u, subgroupBroadcast(a.q3, 7u), subgroupBroadcast(b.q3, 7u), subgroupBroadcast(c.q3, 7u), subgroupBroadcast(d.q3, 7u));
    }
    return s * p.scale;
}

// h's accumulator times c plus e times v (an eighth of a value row).
fn head_axpy(h: Head, c: f32, e: f32, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>) -> Head {
    var r = h;
    r.a0 = h.a0 * c + e * v0;
    if DL > 1u { r.a1 = h.a1 * c + e * v1; }
    if DL > 2u { r.a2 = h.a2 * c + e * v2; }
    if DL > 3u { r.a3 = h.a3 * c + e * v3; }
    return r;
}

// g's accumulators times c[g] plus e[g] times this invocation's eighth of value row `row`
// (c 1 after a block's first position).
fn pv(g: Group, row: u32, col: u32, c: vec4<f32>, e: vec4<f32>) -> Group {
    let v0 = kv_load(true, row, col);
    var v1 = v0;
    var v2 = v0;
    var v3 = v0;
    if DL > 1u { v1 = kv_load(true, row, col + 1u); }
    if DL > 2u { v2 = kv_load(true, row, col + 2u); }
    if DL > 3u { v3 = kv_load(true, row, col + 3u); }
    var r = g;
    r.h0 = head_axpy(g.h0, c.x, e.x, v0, v1, v2, v3);
    if GQA > 1u { r.h1 = head_axpy(g.h1, c.y, e.y, v0, v1, v2, v3); }
    if GQA > 2u { r.h2 = head_axpy(g.h2, c.z, e.z, v0, v1, v2, v3); }
    if GQA > 3u { r.h3 = head_axpy(g.h3, c.w, e.w, v0, v1, v2, v3); }
    return r;
}

// Vec4 j of an invocation's eighth of a head's chunk accumulator into `part` at `at`.
fn part_store(at: u32, lane: u32, j: u32, a: vec4<f32>) {
    let o = at + (lane * DL + j) * 4u;
    part[o] = a.x;
    part[o + 1u] = a.y;
    part[o + 2u] = a.z;
    part[o + 3u] = a.w;
}

// Query head g (of kv head kvh, token t, maximum mx, sum total) after chunk c: normalised
// into `out` where the chunk is the whole context, else its accumulator, maximum and sum
// into `part`.
fn head_store(h: Head, mx: f32, total: f32, t: u32, kvh: u32, g: u32, c: u32, lane: u32) {
    let head = kvh * GQA + g;
    if p.chunks == 1u {
        // No merge dispatch after this one.
        let o = ((p.row0 + t) * p.n_heads + head) * HD4 + lane * DL;
        out4[o] = h.a0 / total;
        if DL > 1u { out4[o + 1u] = h.a1 / total; }
        if DL > 2u { out4[o + 2u] = h.a2 / total; }
        if DL > 3u { out4[o + 3u] = h.a3 / total; }
        return;
    }
    let at = ((t * p.n_heads + head) * p.chunks + c) * (HD4 * 4u + 2u);
    part_store(at, lane, 0u, h.a0);
    if DL > 1u { part_store(at, lane, 1u, h.a1); }
    if DL > 2u { part_store(at, lane, 2u, h.a2); }
    if DL > 3u { part_store(at, lane, 3u, h.a3); }
    if lane == 0u {
        part[at + HD4 * 4u] = mx;
        part[at + HD4 * 4u + 1u] = total;
    }
}

// Workgroup (c, t * n_kv_heads + kvh): positions c * CHUNK .. of token t, kv head kvh, in
// blocks of 8: each invocation scores one position of a block against every head (a
// position past the chunk weighted 0), one maximum per block and head updates the online
// softmax, and each position's weights go back to every invocation with its value row's
// eighth.
@compute @workgroup_size(8, 1, 1)
fn attention_dsg8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let t = wid.y / p.n_kv_heads;
    let kvh = wid.y % p.n_kv_heads;
    let first = wid.x * CHUNK;
    let end = min(first + CHUNK, p.pos0 + t + 1u);
    let c0 = kvh * HD4;
    let col = c0 + lane * DL;
    // Query head g's eighth at qo + g * HD4.
    let qo = ((p.row0 + t) * p.n_heads + kvh * GQA) * HD4 + lane * DL;
    var g: Group;
    g.h0 = head_at(qo);
    if GQA > 1u { g.h1 = head_at(qo + HD4); }
    if GQA > 2u { g.h2 = head_at(qo + 2u * HD4); }
    if GQA > 3u { g.h3 = head_at(qo + 3u * HD4); }
    g.mx = vec4<f32>(-3.0e38);
    // Rows past the chunk read its last row, weighted 0.
    let last = p.row0 + end - 1u;
    for (var b = p.row0 + first; b <= last; b += 8u) {
        let s = select(vec4<f32>(-3.0e38), scores(g, min(b + lane, last), c0), b + lane <= last);
        let mx = max(g.mx, subgroupMax(s));
        let c = exp(g.mx - mx);
        let e = exp(s - mx);
        g.sum = g.sum * c + e;
        g.mx = mx;
        g = pv(g, b, col, c, subgroupBroadcast(e, 0u));
        let one = vec4<f32>(1.0);
        g = pv(g, min(b + 1u, last), col, one, subgroupBroadcast(e, 1u));
        g = pv(g, min(b + 2u, last), col, one, subgroupBroadcast(e, 2u));
        g = pv(g, min(b + 3u, last), col, one, subgroupBroadcast(e, 3u));
        g = pv(g, min(b + 4u, last), col, one, subgroupBroadcast(e, 4u));
        g = pv(g, min(b + 5u, last), col, one, subgroupBroadcast(e, 5u));
        g = pv(g, min(b + 6u, last), col, one, subgroupBroadcast(e, 6u));
        g = pv(g, min(b + 7u, last), col, one, subgroupBroadcast(e, 7u));
    }
    let total = subgroupAdd(g.sum);
    head_store(g.h0, g.mx.x, total.x, t, kvh, 0u, wid.x, lane);
    if GQA > 1u { head_store(g.h1, g.mx.y, total.y, t, kvh, 1u, wid.x, lane); }
    if GQA > 2u { head_store(g.h2, g.mx.z, total.z, t, kvh, 2u, wid.x, lane); }
    if GQA > 3u { head_store(g.h3, g.mx.w, total.w, t, kvh, 3u, wid.x, lane); }
}

// One invocation per (token, query head, vec4 of the head row): `attention_dsg8`'s
// chunks of that head merged, as the online softmax merges positions.
@compute @workgroup_size(64, 1, 1)
fn attention_merge(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if i >= p.n_tokens * p.n_heads * HD4 {
        return;
    }
    let j = i % HD4;
    let th = i / HD4;
    let stride = HD4 * 4u + 2u;
    let base = th * p.chunks * stride;
    // Chunks past the token's last position hold nothing (maximum -3e38, sum 0).
    var m = -3.0e38;
    for (var c = 0u; c < p.chunks; c++) {
        m = max(m, part[base + c * stride + HD4 * 4u]);
    }
    var total = 0.0;
    var a = vec4<f32>(0.0);
    for (var c = 0u; c < p.chunks; c++) {
        let at = base + c * stride;
        let w = exp(part[at + HD4 * 4u] - m);
        total += part[at + HD4 * 4u + 1u] * w;
        a += vec4<f32>(part[at + j * 4u], part[at + j * 4u + 1u], part[at + j * 4u + 2u], part[at + j * 4u + 3u]) * w;
    }
    out4[(p.row0 * p.n_heads + th) * HD4 + j] = a / total;
}
