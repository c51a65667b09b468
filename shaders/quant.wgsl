// Quantised and half-precision weights: dequantisation, embedding gather, and the
// dequantising matrix-vector / matrix-matrix products out = x * dequant(w)^T.
// CPU reference: runtime/src/quant.rs `dequantize`, runtime/src/backend/cpu.rs `qmatmul`, `embed`.
//
// w is n rows of k elements, read as raw little-endian bytes from an array<u32>: in the
// GGUF layout, except Q8_0/Q4_0/Q4_1, which the backend stores split (see `stored_block_in`). The format is the WTYPE override constant (codes as `WeightType::shader_code`),
// so each format is its own specialised pipeline and the switch folds away.
// Every format is decoded in chunks of 32 consecutive elements. Each value is produced by
// the same correctly rounded operations as the reference (products that are exact by
// construction, then one rounding), so dequantisation is bit-exact on every device.
// Halves are decoded with integer operations, which needs no shader-f16 support and keeps
// subnormals exact.

struct Params {
    m: u32,      // tokens (rows of x); for `embed` the number of ids
    k: u32,      // elements per weight row
    n: u32,      // weight rows
    row_bytes: u32,
}

override WTYPE: u32 = 0u;

const F32: u32 = 0u;
const F16: u32 = 1u;
const BF16: u32 = 2u;
const Q8_0: u32 = 3u;
const Q4_0: u32 = 4u;
const Q4_1: u32 = 5u;
const Q4_K: u32 = 6u;
const Q6_K: u32 = 7u;
// Rows per group of the split layout (`backend::wgpu::SPLIT_ROW_GROUP`).
const ROW_GROUP: u32 = 64u;

// Whether x can be read as vec4 (k % 4 == 0).
override X4: bool = false;
// Weight rows per `qmatvec` invocation: 4 or 8.
override ROWS: u32 = 4u;
// Invocations per `qmatvec` workgroup.
override MV_WG: u32 = 64u;
// Whether each block's stored scale d is multiplied by its factor in `factors` (f32, one
// per block, row by row): the "scales" trainable set (Q8_0, Q4_0, Q4_1; for Q4_K and
// Q6_K the super-block's d, one factor per 256 elements).
override FACTORS: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> factors: array<f32>;

fn byte_at(off: u32) -> u32 {
    return (w[off >> 2u] >> ((off & 3u) * 8u)) & 0xFFu;
}

// Four bytes starting at any byte offset.
fn u32_at(off: u32) -> u32 {
    let s = (off & 3u) * 8u;
    let lo = w[off >> 2u];
    if s == 0u {
        return lo;
    }
    return (lo >> s) | (w[(off >> 2u) + 1u] << (32u - s));
}

// A little-endian u16 at an even byte offset.
fn u16_at(off: u32) -> u32 {
    return (w[off >> 2u] >> ((off & 2u) * 8u)) & 0xFFFFu;
}

// Exact for every half, without branches (lanes of a CPU-emulated GPU would run every
// branch): normals re-biased in integer arithmetic, subnormals as mantissa * 2^-24 (exact,
// and a normal f32, so no device flushes it), infinities and NaNs by their bits.
fn half_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let mag = h & 0x7FFFu;
    let normal = sign | ((mag << 13u) + (112u << 23u));
    let sub = sign | bitcast<u32>(ldexp(f32(mag), -24));
    let special = sign | 0x7F800000u | ((mag & 0x3FFu) << 13u);
    return bitcast<f32>(select(select(normal, sub, mag < 0x400u), special, mag >= 0x7C00u));
}

fn f16_at(off: u32) -> f32 {
    return half_to_f32(u16_at(off));
}

// The 32-element block formats (Q8_0, Q4_0, Q4_1) are stored on the device in a split
// layout (`backend::wgpu::split_layout`): first every block's scale (a u16 per block, or for
// Q4_1 a u32 holding d and m), padded to 16 bytes, then every block's quants as 16-byte
// vectors. Each lane then issues one or two wide loads per block instead of many unaligned
// word loads, which is what limits matrix-vector products on CPU-emulated GPUs.
// Blocks are ordered by groups of rows, chunk by chunk (`stored_block_in`); trained scale
// factors stay in GGUF block order (`block_index`).

// The block holding chunk c of row j, in GGUF order (the order of the trained factors).
fn block_index(j: u32, c: u32) -> u32 {
    return j * (p.k / 32u) + c;
}

// Where that block sits in the split layout of a weight of `rows` rows (p.n here;
// quant_sg.wgsl's kernels also read weights of other row counts): rows in groups of
// ROW_GROUP (the last group may be shorter), each group's blocks chunk by chunk, so the
// rows a workgroup reads together lie side by side and its loads stream through memory.
fn stored_block_in(rows: u32, j: u32, c: u32) -> u32 {
    let g0 = j - j % ROW_GROUP;
    return g0 * (p.k / 32u) + c * min(ROW_GROUP, rows - g0) + j - g0;
}

// Block b's f16 scale from the packed u16 scale section.
fn split_scale16(b: u32) -> f32 {
    return half_to_f32((w[b >> 1u] >> (16u * (b & 1u))) & 0xFFFFu);
}

// Block b's stored scale d (Q8_0, Q4_0, Q4_1).
fn stored_scale(b: u32) -> f32 {
    if WTYPE == Q4_1 {
        return half_to_f32(w[b] & 0xFFFFu);
    }
    return split_scale16(b);
}

// Block (j, c)'s scale: the stored one, times its trained factor where given.
fn block_scale(j: u32, c: u32) -> f32 {
    let d = stored_scale(stored_block_in(p.n, j, c));
    if FACTORS {
        return d * factors[block_index(j, c)];
    }
    return d;
}

// The super-block scale d of the K-quant super-block holding chunk c of row j, times its
// trained factor where given (before the sub-block scale multiplies it, as in the reference).
fn super_scale(d: f32, j: u32, c: u32) -> f32 {
    if FACTORS {
        return d * factors[j * (p.k / 256u) + c / 8u];
    }
    return d;
}

// Index in `wq` of block b's first 16-byte quant vector, with `per_block` vectors a block,
// in a weight of `rows` rows (its quants follow all its scales).
fn split_quants_in(rows: u32, b: u32, per_block: u32) -> u32 {
    let blocks = rows * (p.k / 32u);
    var scale_bytes = 2u * blocks;
    if WTYPE == Q4_1 {
        scale_bytes = 4u * blocks;
    }
    return (scale_bytes + 15u) / 16u + b * per_block;
}

// The four signed bytes of a word, in memory order.
fn i8x4(v: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>(bitcast<i32>(v << 24u), bitcast<i32>(v << 16u), bitcast<i32>(v << 8u), bitcast<i32>(v)) >> vec4<u32>(24u));
}

// The four nibbles at bit `shift` of each byte of a word, in memory order.
fn nib4(v: u32, shift: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(v) >> vec4<u32>(shift, shift + 8u, shift + 16u, shift + 24u)) & vec4<u32>(0xFu));
}

// 32 consecutive values as eight vec4s. Named fields, not an array: indexed private
// arrays live in memory on CPU-emulated GPUs and run several times slower.
struct Chunk {
    v0: vec4<f32>,
    v1: vec4<f32>,
    v2: vec4<f32>,
    v3: vec4<f32>,
    v4: vec4<f32>,
    v5: vec4<f32>,
    v6: vec4<f32>,
    v7: vec4<f32>,
}

// A chunk before its affine step: element i is s * q_i + m, with (s0, m0) for elements
// 0..16 and (s1, m1) for 16..32. Keeping the step separate lets a dot product apply it once
// per half instead of once per element. Every format's s * q is exact or is its one
// rounding, and m is added after, so s * q + m is bit-identical to the reference formulas
// (for Q4_0, d * q - 8d equals d * (q - 8) because d * q and 8d are exact). A trained
// factor makes s and s * q roundings too; the reference (`quant::dequantize_scaled`) rounds
// the same steps, though a device may fuse s * q + m.
struct Raw {
    q: Chunk,
    s0: f32,
    s1: f32,
    m0: f32,
    m1: f32,
}

// Elements e .. e+4 of a float row starting at byte `row`, zero past k.
fn float4(row: u32, e: u32) -> vec4<f32> {
    var v: vec4<f32>;
    if WTYPE == F32 {
        let o = (row >> 2u) + e;
        v = vec4<f32>(bitcast<f32>(w[o]), bitcast<f32>(w[o + 1u]), bitcast<f32>(w[o + 2u]), bitcast<f32>(w[o + 3u]));
    } else {
        let lo = u32_at(row + 2u * e);
        let hi = u32_at(row + 2u * e + 4u);
        if WTYPE == BF16 {
            v = bitcast<vec4<f32>>(vec4<u32>(lo << 16u, lo & 0xFFFF0000u, hi << 16u, hi & 0xFFFF0000u));
        } else {
            v = vec4<f32>(half_to_f32(lo & 0xFFFFu), half_to_f32(lo >> 16u), half_to_f32(hi & 0xFFFFu), half_to_f32(hi >> 16u));
        }
    }
    return select(vec4<f32>(0.0), v, vec4<u32>(e, e + 1u, e + 2u, e + 3u) < vec4<u32>(p.k));
}

fn is_float() -> bool {
    return WTYPE == F32 || WTYPE == F16 || WTYPE == BF16;
}

// Chunk c (elements 32c .. 32c+32) of weight row j, before the affine step.
fn raw(j: u32, c: u32) -> Raw {
    var r: Raw;
    // Byte offset of the row, for the formats kept in their GGUF layout.
    let row = j * p.row_bytes;
    // -0.0 leaves every value, negative zero included, unchanged when added.
    r.m0 = -0.0;
    r.m1 = -0.0;
    switch WTYPE {
        case F32, F16, BF16: {
            let e = 32u * c;
            r.q = Chunk(float4(row, e), float4(row, e + 4u), float4(row, e + 8u), float4(row, e + 12u),
                        float4(row, e + 16u), float4(row, e + 20u), float4(row, e + 24u), float4(row, e + 28u));
            r.s0 = 1.0;
        }
        case Q8_0: {
            r.s0 = block_scale(j, c);
            let q = split_quants_in(p.n, stored_block_in(p.n, j, c), 2u);
            let lo = wq[q];
            let hi = wq[q + 1u];
            r.q = Chunk(i8x4(lo.x), i8x4(lo.y), i8x4(lo.z), i8x4(lo.w), i8x4(hi.x), i8x4(hi.y), i8x4(hi.z), i8x4(hi.w));
        }
        case Q4_0, Q4_1: {
            let b = stored_block_in(p.n, j, c);
            r.s0 = block_scale(j, c);
            if WTYPE == Q4_1 {
                r.m0 = half_to_f32(w[b] >> 16u);
            } else {
                r.m0 = -8.0 * r.s0;
            }
            let q = wq[split_quants_in(p.n, b, 1u)];
            r.q = Chunk(nib4(q.x, 0u), nib4(q.y, 0u), nib4(q.z, 0u), nib4(q.w, 0u),
                        nib4(q.x, 4u), nib4(q.y, 4u), nib4(q.z, 4u), nib4(q.w, 4u));
        }
        case Q4_K: {
            // 144-byte super-blocks: every field 4-byte aligned.
            let sb = row + 144u * (c / 8u);
            let sub = c % 8u;
            let dm = w[sb >> 2u];
            let d = super_scale(half_to_f32(dm & 0xFFFFu), j, c);
            let dmin = half_to_f32(dm >> 16u);
            var sc: u32;
            var mn: u32;
            if sub < 4u {
                sc = byte_at(sb + 4u + sub) & 63u;
                mn = byte_at(sb + 8u + sub) & 63u;
            } else {
                sc = (byte_at(sb + 8u + sub) & 0xFu) | ((byte_at(sb + sub) >> 6u) << 4u);
                mn = (byte_at(sb + 8u + sub) >> 4u) | ((byte_at(sb + 4u + sub) >> 6u) << 4u);
            }
            r.s0 = d * f32(sc);
            r.m0 = -(dmin * f32(mn));
            let q = (sb + 16u + 32u * (sub / 2u)) >> 2u;
            let s = 4u * (sub % 2u);
            r.q = Chunk(nib4(w[q], s), nib4(w[q + 1u], s), nib4(w[q + 2u], s), nib4(w[q + 3u], s),
                        nib4(w[q + 4u], s), nib4(w[q + 5u], s), nib4(w[q + 6u], s), nib4(w[q + 7u], s));
        }
        case Q6_K: {
            // Chunk (h, g) of a super-block: elements 128h + 32g + l, l < 32; low nibbles from
            // ql, two high bits from qh, one i8 scale per 16 elements.
            let sb = row + 210u * (c / 8u);
            let sub = c % 8u;
            let h = sub / 4u;
            let g = sub % 4u;
            let d = super_scale(f16_at(sb + 208u), j, c);
            let ql = sb + 64u * h + 32u * (g % 2u);
            let qh = sb + 128u + 32u * h;
            let ls = 4u * (g / 2u);
            let hs = 2u * g;
            let scales = sb + 192u + 8u * h + 2u * g;
            r.s0 = d * f32(bitcast<i32>(byte_at(scales) << 24u) >> 24u);
            r.s1 = d * f32(bitcast<i32>(byte_at(scales + 1u) << 24u) >> 24u);
            r.q = Chunk(q6(u32_at(ql), u32_at(qh), ls, hs), q6(u32_at(ql + 4u), u32_at(qh + 4u), ls, hs),
                        q6(u32_at(ql + 8u), u32_at(qh + 8u), ls, hs), q6(u32_at(ql + 12u), u32_at(qh + 12u), ls, hs),
                        q6(u32_at(ql + 16u), u32_at(qh + 16u), ls, hs), q6(u32_at(ql + 20u), u32_at(qh + 20u), ls, hs),
                        q6(u32_at(ql + 24u), u32_at(qh + 24u), ls, hs), q6(u32_at(ql + 28u), u32_at(qh + 28u), ls, hs));
            return r;
        }
        default: {}
    }
    // One scale and offset for the whole chunk.
    r.s1 = r.s0;
    r.m1 = r.m0;
    return r;
}

// Four 6-bit Q6_K values minus 32: low nibbles at bit `ls` of each byte of `lo`, high bit
// pairs at bit `hs` of each byte of `hi`.
fn q6(lo: u32, hi: u32, ls: u32, hs: u32) -> vec4<f32> {
    let sh = vec4<u32>(0u, 8u, 16u, 24u);
    let l = (vec4<u32>(lo) >> (sh + vec4<u32>(ls))) & vec4<u32>(0xFu);
    let h = (vec4<u32>(hi) >> (sh + vec4<u32>(hs))) & vec4<u32>(3u);
    return vec4<f32>(vec4<i32>(l | (h << vec4<u32>(4u))) - vec4<i32>(32));
}

// Chunk c of weight row j, dequantised.
fn chunk(j: u32, c: u32) -> Chunk {
    let r = raw(j, c);
    if is_float() {
        return r.q;
    }
    let s0 = vec4<f32>(r.s0);
    let s1 = vec4<f32>(r.s1);
    let m0 = vec4<f32>(r.m0);
    let m1 = vec4<f32>(r.m1);
    return Chunk(s0 * r.q.v0 + m0, s0 * r.q.v1 + m0, s0 * r.q.v2 + m0, s0 * r.q.v3 + m0,
                 s1 * r.q.v4 + m1, s1 * r.q.v5 + m1, s1 * r.q.v6 + m1, s1 * r.q.v7 + m1);
}

// x[o .. o+4]: vec4 loads when every row of x is vec4-aligned (X4), scalar loads otherwise.
fn x_at(o: u32) -> vec4<f32> {
    if X4 {
        return x4[o / 4u];
    }
    return vec4<f32>(x[o], x[o + 1u], x[o + 2u], x[o + 3u]);
}

// 32 consecutive elements of x and the sums of each half, loaded once per chunk and used
// for several weight rows.
struct XChunk {
    v: Chunk,
    sum0: f32,
    sum1: f32,
}

fn x_chunk(o: u32) -> XChunk {
    let v = Chunk(x_at(o), x_at(o + 4u), x_at(o + 8u), x_at(o + 12u), x_at(o + 16u), x_at(o + 20u), x_at(o + 24u), x_at(o + 28u));
    let one = vec4<f32>(1.0);
    return XChunk(v, dot(v.v0 + v.v1 + v.v2 + v.v3, one), dot(v.v4 + v.v5 + v.v6 + v.v7, one));
}

// The dot product of dequantised chunk c of weight row j with x.
fn dot_row(j: u32, c: u32, x: XChunk) -> f32 {
    let r = raw(j, c);
    let d0 = dot(r.q.v0, x.v.v0) + dot(r.q.v1, x.v.v1) + dot(r.q.v2, x.v.v2) + dot(r.q.v3, x.v.v3);
    let d1 = dot(r.q.v4, x.v.v4) + dot(r.q.v5, x.v.v5) + dot(r.q.v6, x.v.v6) + dot(r.q.v7, x.v.v7);
    if is_float() {
        return d0 + d1;
    }
    return r.s0 * d0 + r.s1 * d1 + r.m0 * x.sum0 + r.m1 * x.sum1;
}

// Writes the elements of a chunk below k to out[base + 32c ..].
fn store_chunk(y: Chunk, base: u32, c: u32) {
    let e = 32u * c;
    let vs = array<vec4<f32>, 8>(y.v0, y.v1, y.v2, y.v3, y.v4, y.v5, y.v6, y.v7);
    for (var i = 0u; i < 32u; i++) {
        if e + i < p.k {
            out[base + e + i] = vs[i / 4u][i % 4u];
        }
    }
}

fn n_chunks() -> u32 {
    return (p.k + 31u) / 32u;
}

// One invocation per 32-element chunk of the n rows of k elements.
@compute @workgroup_size(64, 1, 1)
fn dequant(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let nc = n_chunks();
    let j = idx / nc;
    if j >= p.n {
        return;
    }
    let c = idx % nc;
    store_chunk(chunk(j, c), j * p.k, c);
}

// One invocation per (id, chunk): out[t, :] = dequant(row ids[t]). Ids past the table
// (p.n rows) give zeros; hosts validate ids before upload.
@compute @workgroup_size(64, 1, 1)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let nc = n_chunks();
    let t = idx / nc;
    let c = idx % nc;
    if t >= p.m {
        return;
    }
    var y: Chunk;
    let id = ids[t];
    if id < p.n {
        y = chunk(id, c);
    }
    store_chunk(y, t * p.k, c);
}

// One token: one invocation per ROWS (4 or 8) weight rows, so each load of x serves
// several rows (loads, not arithmetic, bound this kernel on CPU-emulated GPUs). Eight rows
// amortise x better; four keep more invocations busy when n is small. Small workgroups
// (MV_WG) spread short matrices over every core: CPU-emulated GPUs run one workgroup per
// thread.
@compute @workgroup_size(MV_WG, 1, 1)
fn qmatvec(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j0 = ROWS * (gid.x + gid.y * nwg.x * MV_WG);
    if j0 >= p.n {
        return;
    }
    // Rows past n are clamped to the last one and their results discarded.
    let last = p.n - 1u;
    let r0 = min(j0 + 0u, last);
    let r1 = min(j0 + 1u, last);
    let r2 = min(j0 + 2u, last);
    let r3 = min(j0 + 3u, last);
    let r4 = min(j0 + 4u, last);
    let r5 = min(j0 + 5u, last);
    let r6 = min(j0 + 6u, last);
    let r7 = min(j0 + 7u, last);
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    for (var c = 0u; c < n_chunks(); c++) {
        let o = 32u * c;
        let xs = x_chunk(o);
        lo += vec4<f32>(dot_row(r0, c, xs), dot_row(r1, c, xs), dot_row(r2, c, xs), dot_row(r3, c, xs));
        if ROWS == 8u {
            hi += vec4<f32>(dot_row(r4, c, xs), dot_row(r5, c, xs), dot_row(r6, c, xs), dot_row(r7, c, xs));
        }
    }
    for (var t = 0u; t < 4u; t++) {
        if j0 + t < p.n {
            out[j0 + t] = lo[t];
        }
        if ROWS == 8u && j0 + 4u + t < p.n {
            out[j0 + 4u + t] = hi[t];
        }
    }
}

// Partial sums of `qmatvec_split`: four rows' (lo) and four more rows' (hi) per invocation,
// for up to 64 invocations.
var<workgroup> partial: array<vec4<f32>, 128>;

// One token, the other way round: one workgroup of MV_WG invocations (a power of two, at most
// 64) per ROWS weight rows, its invocations striding over the chunks of k and their partial
// sums added in workgroup memory. Neighbouring invocations read neighbouring chunks of the
// same rows, which real GPUs coalesce; which of the two forms is faster is measured per
// device (backend::tune).
@compute @workgroup_size(MV_WG, 1, 1)
fn qmatvec_split(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j0 = ROWS * (wid.x + wid.y * nwg.x);
    // Uniform per workgroup, so every invocation of a running workgroup reaches the barriers.
    if j0 >= p.n {
        return;
    }
    let last = p.n - 1u;
    let r0 = min(j0 + 0u, last);
    let r1 = min(j0 + 1u, last);
    let r2 = min(j0 + 2u, last);
    let r3 = min(j0 + 3u, last);
    let r4 = min(j0 + 4u, last);
    let r5 = min(j0 + 5u, last);
    let r6 = min(j0 + 6u, last);
    let r7 = min(j0 + 7u, last);
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    for (var c = lid; c < n_chunks(); c += MV_WG) {
        let xs = x_chunk(32u * c);
        lo += vec4<f32>(dot_row(r0, c, xs), dot_row(r1, c, xs), dot_row(r2, c, xs), dot_row(r3, c, xs));
        if ROWS == 8u {
            hi += vec4<f32>(dot_row(r4, c, xs), dot_row(r5, c, xs), dot_row(r6, c, xs), dot_row(r7, c, xs));
        }
    }
    partial[lid] = lo;
    partial[64u + lid] = hi;
    workgroupBarrier();
    for (var s = MV_WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            partial[lid] += partial[lid + s];
            partial[64u + lid] += partial[64u + lid + s];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        for (var t = 0u; t < 4u; t++) {
            if j0 + t < p.n {
                out[j0 + t] = partial[0][t];
            }
            if ROWS == 8u && j0 + 4u + t < p.n {
                out[j0 + 4u + t] = partial[64][t];
            }
        }
    }
}

// Several tokens: one invocation per (weight row, group of 4 tokens). The chunk's decode
// is repeated per token (the compiler may share it); its loads hit the cache. gid.x walks rows, gid.y token groups.
@compute @workgroup_size(64, 1, 1)
fn qmatmul(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let t0 = gid.y * 4u;
    if j >= p.n || t0 >= p.m {
        return;
    }
    // Tokens past m are clamped to the last one and their results discarded.
    let last = p.m - 1u;
    let x0 = t0 * p.k;
    let x1 = min(t0 + 1u, last) * p.k;
    let x2 = min(t0 + 2u, last) * p.k;
    let x3 = min(t0 + 3u, last) * p.k;
    var acc = vec4<f32>(0.0);
    for (var c = 0u; c < n_chunks(); c++) {
        let o = 32u * c;
        acc += vec4<f32>(dot_row(j, c, x_chunk(x0 + o)), dot_row(j, c, x_chunk(x1 + o)),
                         dot_row(j, c, x_chunk(x2 + o)), dot_row(j, c, x_chunk(x3 + o)));
    }
    for (var t = 0u; t < 4u; t++) {
        if t0 + t < p.m {
            out[(t0 + t) * p.n + j] = acc[t];
        }
    }
}

// The input gradient of the product: out[t, :] = sum over j of x[t, j] * dequant(w row j),
// with x = dy [m, n] and out = dx [m, k]. One invocation per (chunk c of k, token t),
// tokens fastest, so the invocations of a workgroup read the same weight blocks (one
// decode per block and lane, loads shared in the cache); the weight rows are dequantised
// as they are read and never written.
@compute @workgroup_size(64, 1, 1)
fn qmatmul_t(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let c = idx / p.m;
    let t = idx % p.m;
    if c >= n_chunks() {
        return;
    }
    var acc: Chunk;
    for (var j = 0u; j < p.n; j++) {
        let g = vec4<f32>(x[t * p.n + j]);
        let y = chunk(j, c);
        acc = Chunk(acc.v0 + g * y.v0, acc.v1 + g * y.v1, acc.v2 + g * y.v2, acc.v3 + g * y.v3,
                    acc.v4 + g * y.v4, acc.v5 + g * y.v5, acc.v6 + g * y.v6, acc.v7 + g * y.v7);
    }
    store_chunk(acc, t * p.k, c);
}
