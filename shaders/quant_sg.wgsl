// Prompt-sized products of the 32-element block formats (Q8_0, Q4_0, Q4_1, split layout)
// on subgroups of 8: out = x * dequant(w)^T, as `qmatmul` in quant.wgsl computes it;
// CPU reference: runtime/src/backend/cpu.rs `qmatmul`. Only used where the device has
// subgroups of exactly 8 invocations (lavapipe on AVX2 or AVX-512 hosts), chosen per device
// by measurement (backend::tune) against dequantising to f32 and `matmul8`.
//
// Why: on a CPU-emulated GPU a storage load whose address differs per lane runs as a loop
// over the lanes, so loads, not arithmetic, bound the products. Each invocation here owns
// four weight rows (output columns) and eight rows of x; its weights arrive as packed
// blocks (five or nine words per 32 values, dequantised in registers), and each of the 8
// invocations of a subgroup loads one eighth of a 32-element chunk of every x row, which
// `subgroupBroadcast` (a register shuffle) then hands to the others. The dequantising
// pass and its f32 copy of the weights disappear.
//
// A separate file because a module using subgroup operations fails validation on devices
// without them. The helpers below are copies of quant.wgsl's (tests/tests/shaders.rs checks
// that every function of the same name stays identical; `Params`, the format codes and the
// block decoding of `load_block` / `raw_quad` mirror quant.wgsl's `raw` and are checked by
// the conformance cases instead).

struct Params {
    m: u32,      // tokens (rows of x)
    k: u32,      // elements per weight row (a multiple of 32)
    n: u32,      // weight rows
    row_bytes: u32,
    row0: u32,   // `qmatvec_sg8`: the weight rows row0 .. row_end this dispatch computes
    row_end: u32,
    eps: f32,    // NORM's epsilon
    n2: u32,     // rows of the second and third weights (`qmatvec_qkv_sg8`'s k and v; n elsewhere)
    head_dim: u32, // ROPE: the heads' width and the token's position
    pos: u32,
}

override WTYPE: u32 = 5u;
override FACTORS: bool = false;

const Q8_0: u32 = 3u;
const Q4_0: u32 = 4u;
const Q4_1: u32 = 5u;
const ROW_GROUP: u32 = 64u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> wq: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> factors: array<f32>;
// The same bytes as `w`, 16 to a texel, TEX_W texels a row, read instead of `w` when TEX
// (a 1x1 placeholder otherwise): lavapipe from Mesa 22 on hosts without AVX-512 loads a
// storage buffer lane by lane through the stack but fetches texels with a gather, so its
// products ran 2-4x faster this way (BENCHMARKS.md); backend::tune measures which to use.
// A read-only storage texture rather than a sampled one: lavapipe inlines its loads
// (about 40 instructions for 8 lanes) where a sampled texture's go through a call of about
// 150 with level and bounds arithmetic.
@group(0) @binding(8) var wt: texture_storage_2d<rgba32uint, read>;

override TEX: bool = false;
const TEX_W: u32 = 4096u;
// x as a texture (u32 x 4 texels: row r of x is texel row r), read by `qmatmul_sg8` instead
// of `x4` when XTEX, for the same reason as TEX.
@group(0) @binding(9) var xt: texture_storage_2d<rgba32uint, read>;
override XTEX: bool = false;
// `qmatvec_swiglu_sg8`'s second weight (up) and its factors, as `wq`, `wt` and `factors`
// hold the first (gate); placeholders for the other kernels.
@group(0) @binding(10) var<storage, read> wq2: array<vec4<u32>>;
@group(0) @binding(11) var<storage, read> factors2: array<f32>;
@group(0) @binding(12) var wt2: texture_storage_2d<rgba32uint, read>;
// `qmatvec_sg8` and `qmatvec_swiglu_sg8` where NORM: x is rmsnorm(a + h) * norm_w, a
// decode step's pending residual add (`resid` a, `x4` h) and the norm after it; where SUM,
// one subgroup stores a + h to `sum4`. The norm's scale 1 / sqrt(mean((a + h)^2) + eps)
// multiplies every row's sum, so it is applied once at the end from squares summed as the
// chunks go by: the norm costs no pass over x and no dispatch of its own. Placeholders
// for the other kernels.
override NORM: bool = false;
override SUM: bool = false;
@group(0) @binding(13) var<storage, read> resid: array<vec4<f32>>;
@group(0) @binding(14) var<storage, read> norm_w: array<vec4<f32>>;
@group(0) @binding(15) var<storage, read_write> sum4: array<vec4<f32>>;
// `qmatvec_qkv_sg8`'s third weight (v) as `wq2`, `factors2` and `wt2` hold the second (k),
// and its k and v outputs beside `out` (q); placeholders for the other kernels.
@group(0) @binding(16) var<storage, read> wq3: array<vec4<u32>>;
@group(0) @binding(17) var<storage, read> factors3: array<f32>;
@group(0) @binding(18) var wt3: texture_storage_2d<rgba32uint, read>;
@group(0) @binding(19) var<storage, read_write> out2: array<f32>;
@group(0) @binding(20) var<storage, read_write> out3: array<f32>;
// ROPE (`qmatvec_qkv_sg8`): q and k rotated as they are stored, q to `out` and k and v
// to row `pos` of the caches in `out2` and `out3`, with rope.wgsl's (cos, sin) table.
override ROPE: bool = false;
@group(0) @binding(21) var<storage, read> rope4: array<vec4<f32>>;
// The matrix-vector kernels' x, resid and norm_w again, as uniform buffers of their first
// X_UNIFORM_VEC4S vec4s, read instead of the storage bindings where X_UNIFORM (k at most
// 4 X_UNIFORM_VEC4S): lavapipe (Mesa 22) loads a storage buffer lane by lane in a loop
// but a uniform one with a gather, so a chunk of x costs one gather here (generation
// 1.13x on an AVX2-only host, BENCHMARKS.md, seventeenth part). Fixed-size, as uniform
// arrays must be; backend::wgpu's X_UNIFORM_BYTES is their size (a test keeps the two
// equal).
override X_UNIFORM: bool = false;
const X_UNIFORM_VEC4S: u32 = 1024u;
@group(0) @binding(22) var<uniform> x_u: array<vec4<f32>, X_UNIFORM_VEC4S>;
@group(0) @binding(23) var<uniform> resid_u: array<vec4<f32>, X_UNIFORM_VEC4S>;
@group(0) @binding(24) var<uniform> norm_w_u: array<vec4<f32>, X_UNIFORM_VEC4S>;

// Elements 4q .. 4q+4 of row r of x.
fn x_quad(r: u32, q: u32) -> vec4<f32> {
    if XTEX {
        return bitcast<vec4<f32>>(textureLoad(xt, vec2<u32>(q, r)));
    }
    return x4[r * (p.k / 4u) + q];
}

fn half_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let mag = h & 0x7FFFu;
    let normal = sign | ((mag << 13u) + (112u << 23u));
    let sub = sign | bitcast<u32>(ldexp(f32(mag), -24));
    let special = sign | 0x7F800000u | ((mag & 0x3FFu) << 13u);
    return bitcast<f32>(select(select(normal, sub, mag < 0x400u), special, mag >= 0x7C00u));
}

fn block_index(j: u32, c: u32) -> u32 {
    return j * (p.k / 32u) + c;
}

// The kernels here take up to three weights of one type and width, `which` 0, 1 and 2 (a
// literal at every call, so the selections fold away): the first has n rows, the others
// n2.
fn weight_rows(which: u32) -> u32 {
    if which == 0u {
        return p.n;
    }
    return p.n2;
}

// Where block (j, c) of a weight of `rows` rows sits in the split layout (quant.wgsl's).
fn stored_block_in(rows: u32, j: u32, c: u32) -> u32 {
    let g0 = j - j % ROW_GROUP;
    return g0 * (p.k / 32u) + c * min(ROW_GROUP, rows - g0) + j - g0;
}

// Words 4i .. 4i+4 of weight `which`.
fn w_vec_of(which: u32, i: u32) -> vec4<u32> {
    if TEX {
        let at = vec2<u32>(i % TEX_W, i / TEX_W);
        if which == 2u {
            return textureLoad(wt3, at);
        }
        if which == 1u {
            return textureLoad(wt2, at);
        }
        return textureLoad(wt, at);
    }
    if which == 2u {
        return wq3[i];
    }
    if which == 1u {
        return wq2[i];
    }
    return wq[i];
}

fn w_vec(i: u32) -> vec4<u32> {
    return w_vec_of(0u, i);
}

// Word i of the weights.
fn w_word(i: u32) -> u32 {
    if TEX {
        return w_vec(i / 4u)[i % 4u];
    }
    return w[i];
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

fn i8x4(v: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>(bitcast<i32>(v << 24u), bitcast<i32>(v << 16u), bitcast<i32>(v << 8u), bitcast<i32>(v)) >> vec4<u32>(24u));
}

fn nib4(v: u32, shift: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(v) >> vec4<u32>(shift, shift + 8u, shift + 16u, shift + 24u)) & vec4<u32>(0xFu));
}

// One weight row's block: its scale, offset and quants (Q8_0: 32 bytes in qa, qb; Q4_0 and
// Q4_1: 32 nibbles in qa).
struct Block {
    qa: vec4<u32>,
    qb: vec4<u32>,
    d: f32,
    m: f32,
}

// Block c of weight row j.
fn load_block(j: u32, c: u32) -> Block {
    let b = stored_block_in(p.n, j, c);
    // The stored scale word (as quant.wgsl's `stored_scale`: Q4_1 a word of d and m per
    // block, the others a u16 d).
    var dm: u32;
    if WTYPE == Q4_1 {
        dm = w_word(b);
    } else {
        dm = w_word(b >> 1u) >> (16u * (b & 1u));
    }
    var r = block_quants(0u, b);
    let a = block_affine(0u, dm, j, c);
    r.d = a.x;
    r.m = a.y;
    return r;
}

// Stored block b's quants of weight `which`, its d and m left unset.
fn block_quants(which: u32, b: u32) -> Block {
    var r: Block;
    if WTYPE == Q8_0 {
        let q = split_quants_in(weight_rows(which), b, 2u);
        r.qa = w_vec_of(which, q);
        r.qb = w_vec_of(which, q + 1u);
    } else {
        r.qa = w_vec_of(which, split_quants_in(weight_rows(which), b, 1u));
    }
    return r;
}

// Block c of weight row j's d and m from its scale word (Q4_1: d and m; the others: d in
// the low half): d times the block's trained factor where given (weight `which`'s).
fn block_affine(which: u32, dm: u32, j: u32, c: u32) -> vec2<f32> {
    var d = half_to_f32(dm & 0xFFFFu);
    if FACTORS {
        if which == 2u {
            d *= factors3[block_index(j, c)];
        } else if which == 1u {
            d *= factors2[block_index(j, c)];
        } else {
            d *= factors[block_index(j, c)];
        }
    }
    // -0.0 leaves every value, negative zero included, unchanged when added.
    var m = -0.0;
    if WTYPE == Q4_1 {
        m = half_to_f32(dm >> 16u);
    } else if WTYPE == Q4_0 {
        m = -8.0 * d;
    }
    return vec2<f32>(d, m);
}

// Elements 4t .. 4t+4 of a block before its affine step (t a literal, so the selections
// fold away): Q8_0's bytes in order, Q4's low nibbles for elements 0..16 and high nibbles
// for 16..32.
fn raw_quad(b: Block, t: u32) -> vec4<f32> {
    if WTYPE == Q8_0 {
        return i8x4(select(b.qb[t % 4u], b.qa[t % 4u], t < 4u));
    }
    return nib4(b.qa[t % 4u], 4u * (t / 4u));
}

// The same elements dequantised, as quant.wgsl's `chunk` does.
fn quad(b: Block, t: u32) -> vec4<f32> {
    return vec4<f32>(b.d) * raw_quad(b, t) + vec4<f32>(b.m);
}

// Elements 4t .. 4t+4 of four weight rows' blocks as the rows of a matrix, so that
// `wt * x` gives the four rows' sums over those elements.
fn quads(b0: Block, b1: Block, b2: Block, b3: Block, t: u32) -> mat4x4<f32> {
    return transpose(mat4x4<f32>(quad(b0, t), quad(b1, t), quad(b2, t), quad(b3, t)));
}

// Workgroup (x, y): weight rows col + 64c (c < 4, col = 256x + lid) and rows 8y .. 8y+8 of x. Rows
// past n or m are clamped to the last, computed and not stored, so every invocation
// reaches the subgroup operations.
@compute @workgroup_size(64, 1, 1)
fn qmatmul_sg8(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let chunks = p.k / 32u;
    let col = wg.x * 256u + lid;
    let i0 = wg.y * 8u;
    let last = p.m - 1u;
    let j0 = min(col + 0u, p.n - 1u);
    let j1 = min(col + 64u, p.n - 1u);
    let j2 = min(col + 128u, p.n - 1u);
    let j3 = min(col + 192u, p.n - 1u);
    // acc_r: row i0 + r of out at the four weight rows.
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    for (var c = 0u; c < chunks; c++) {
        // This invocation's quarter-row (elements 4 lane .. 4 lane + 4) of the chunk of
        // each x row.
        let xo = 8u * c + lane;
        let xr0 = x_quad(min(i0 + 0u, last), xo);
        let xr1 = x_quad(min(i0 + 1u, last), xo);
        let xr2 = x_quad(min(i0 + 2u, last), xo);
        let xr3 = x_quad(min(i0 + 3u, last), xo);
        let xr4 = x_quad(min(i0 + 4u, last), xo);
        let xr5 = x_quad(min(i0 + 5u, last), xo);
        let xr6 = x_quad(min(i0 + 6u, last), xo);
        let xr7 = x_quad(min(i0 + 7u, last), xo);
        let b0 = load_block(j0, c);
        let b1 = load_block(j1, c);
        let b2 = load_block(j2, c);
        let b3 = load_block(j3, c);
        let w0 = quads(b0, b1, b2, b3, 0u);
        acc0 += w0 * subgroupBroadcast(xr0, 0u);
        acc1 += w0 * subgroupBroadcast(xr1, 0u);
        acc2 += w0 * subgroupBroadcast(xr2, 0u);
        acc3 += w0 * subgroupBroadcast(xr3, 0u);
        acc4 += w0 * subgroupBroadcast(xr4, 0u);
        acc5 += w0 * subgroupBroadcast(xr5, 0u);
        acc6 += w0 * subgroupBroadcast(xr6, 0u);
        acc7 += w0 * subgroupBroadcast(xr7, 0u);
        let w1 = quads(b0, b1, b2, b3, 1u);
        acc0 += w1 * subgroupBroadcast(xr0, 1u);
        acc1 += w1 * subgroupBroadcast(xr1, 1u);
        acc2 += w1 * subgroupBroadcast(xr2, 1u);
        acc3 += w1 * subgroupBroadcast(xr3, 1u);
        acc4 += w1 * subgroupBroadcast(xr4, 1u);
        acc5 += w1 * subgroupBroadcast(xr5, 1u);
        acc6 += w1 * subgroupBroadcast(xr6, 1u);
        acc7 += w1 * subgroupBroadcast(xr7, 1u);
        let w2 = quads(b0, b1, b2, b3, 2u);
        acc0 += w2 * subgroupBroadcast(xr0, 2u);
        acc1 += w2 * subgroupBroadcast(xr1, 2u);
        acc2 += w2 * subgroupBroadcast(xr2, 2u);
        acc3 += w2 * subgroupBroadcast(xr3, 2u);
        acc4 += w2 * subgroupBroadcast(xr4, 2u);
        acc5 += w2 * subgroupBroadcast(xr5, 2u);
        acc6 += w2 * subgroupBroadcast(xr6, 2u);
        acc7 += w2 * subgroupBroadcast(xr7, 2u);
        let w3 = quads(b0, b1, b2, b3, 3u);
        acc0 += w3 * subgroupBroadcast(xr0, 3u);
        acc1 += w3 * subgroupBroadcast(xr1, 3u);
        acc2 += w3 * subgroupBroadcast(xr2, 3u);
        acc3 += w3 * subgroupBroadcast(xr3, 3u);
        acc4 += w3 * subgroupBroadcast(xr4, 3u);
        acc5 += w3 * subgroupBroadcast(xr5, 3u);
        acc6 += w3 * subgroupBroadcast(xr6, 3u);
        acc7 += w3 * subgroupBroadcast(xr7, 3u);
        let w4 = quads(b0, b1, b2, b3, 4u);
        acc0 += w4 * subgroupBroadcast(xr0, 4u);
        acc1 += w4 * subgroupBroadcast(xr1, 4u);
        acc2 += w4 * subgroupBroadcast(xr2, 4u);
        acc3 += w4 * subgroupBroadcast(xr3, 4u);
        acc4 += w4 * subgroupBroadcast(xr4, 4u);
        acc5 += w4 * subgroupBroadcast(xr5, 4u);
        acc6 += w4 * subgroupBroadcast(xr6, 4u);
        acc7 += w4 * subgroupBroadcast(xr7, 4u);
        let w5 = quads(b0, b1, b2, b3, 5u);
        acc0 += w5 * subgroupBroadcast(xr0, 5u);
        acc1 += w5 * subgroupBroadcast(xr1, 5u);
        acc2 += w5 * subgroupBroadcast(xr2, 5u);
        acc3 += w5 * subgroupBroadcast(xr3, 5u);
        acc4 += w5 * subgroupBroadcast(xr4, 5u);
        acc5 += w5 * subgroupBroadcast(xr5, 5u);
        acc6 += w5 * subgroupBroadcast(xr6, 5u);
        acc7 += w5 * subgroupBroadcast(xr7, 5u);
        let w6 = quads(b0, b1, b2, b3, 6u);
        acc0 += w6 * subgroupBroadcast(xr0, 6u);
        acc1 += w6 * subgroupBroadcast(xr1, 6u);
        acc2 += w6 * subgroupBroadcast(xr2, 6u);
        acc3 += w6 * subgroupBroadcast(xr3, 6u);
        acc4 += w6 * subgroupBroadcast(xr4, 6u);
        acc5 += w6 * subgroupBroadcast(xr5, 6u);
        acc6 += w6 * subgroupBroadcast(xr6, 6u);
        acc7 += w6 * subgroupBroadcast(xr7, 6u);
        let w7 = quads(b0, b1, b2, b3, 7u);
        acc0 += w7 * subgroupBroadcast(xr0, 7u);
        acc1 += w7 * subgroupBroadcast(xr1, 7u);
        acc2 += w7 * subgroupBroadcast(xr2, 7u);
        acc3 += w7 * subgroupBroadcast(xr3, 7u);
        acc4 += w7 * subgroupBroadcast(xr4, 7u);
        acc5 += w7 * subgroupBroadcast(xr5, 7u);
        acc6 += w7 * subgroupBroadcast(xr6, 7u);
        acc7 += w7 * subgroupBroadcast(xr7, 7u);
    }
    let cols = vec4<u32>(col, col + 64u, col + 128u, col + 192u);
    store(i0 + 0u, cols, acc0);
    store(i0 + 1u, cols, acc1);
    store(i0 + 2u, cols, acc2);
    store(i0 + 3u, cols, acc3);
    store(i0 + 4u, cols, acc4);
    store(i0 + 5u, cols, acc5);
    store(i0 + 6u, cols, acc6);
    store(i0 + 7u, cols, acc7);
}

// Row i of out at columns `cols`, those that exist.
fn store(i: u32, cols: vec4<u32>, v: vec4<f32>) {
    if i >= p.m {
        return;
    }
    for (var c = 0u; c < 4u; c++) {
        if cols[c] < p.n {
            out[i * p.n + cols[c]] = v[c];
        }
    }
}

// Weight rows per `qmatvec_sg8` invocation (4 or 8, chosen per device by measurement; 1
// for the last, partial row group where n is not a multiple of the chosen count) and
// invocations per workgroup (a multiple of 8, chosen by measurement).
override ROWS: u32 = 4u;
override MV_WG: u32 = 16u;

// The scale words of blocks b .. b+ROWS (b a multiple of ROWS): for Q4_1 block b+r's word
// of d and m is `lo[r]` (r < 4) or `hi[r - 4]`; for the others its u16 d is half r % 2 of
// word r / 2 of `lo`. One texel holds four Q4_1 words or eight u16 scales, so the rows'
// scales take one or two loads instead of one per row. With one row, its scale is the
// low half of `lo[0]` wherever it lies.
struct Scales {
    lo: vec4<u32>,
    hi: vec4<u32>,
}

fn load_scales(which: u32, b: u32) -> Scales {
    var s: Scales;
    if ROWS == 1u {
        if WTYPE == Q4_1 {
            s.lo.x = w_vec_of(which, b / 4u)[b % 4u];
        } else {
            s.lo.x = w_vec_of(which, b / 8u)[b % 8u / 2u] >> (16u * (b % 2u));
        }
    } else if WTYPE == Q4_1 {
        s.lo = w_vec_of(which, b / 4u);
        if ROWS > 4u {
            s.hi = w_vec_of(which, b / 4u + 1u);
        }
    } else {
        let v = w_vec_of(which, b / 8u);
        s.lo = select(v, v.zwzw, b % 8u != 0u);
    }
    return s;
}

// Block b+r's d and m (for weight row j at chunk c), as `load_block` gives them; r a
// literal, so the selections fold.
fn block_dm(which: u32, s: Scales, r: u32, j: u32, c: u32) -> vec2<f32> {
    if WTYPE == Q4_1 {
        return block_affine(which, select(s.hi[r % 4u], s.lo[r % 4u], r < 4u), j, c);
    }
    return block_affine(which, s.lo[r / 2u] >> (16u * (r % 2u)), j, c);
}

// Elements 4t .. 4t+4 of a block before its affine step, each times the power of two
// `quad_scale(t)` undoes (t a literal): Q4 nibbles are masked where they lie in their word
// instead of shifted down, one instruction less per element; Q8_0 bytes are moved to the
// top (the sign bit) and masked. Powers of two keep every product, and so every sum,
// exactly as `raw_quad` gives it.
fn scaled_quad(b: Block, t: u32) -> vec4<f32> {
    if WTYPE == Q8_0 {
        let v = select(b.qb[t % 4u], b.qa[t % 4u], t < 4u);
        return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(v << 24u, v << 16u, v << 8u, v) & vec4<u32>(0xFF000000u)));
    }
    let v = b.qa[t % 4u];
    if t < 4u {
        return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(v) & vec4<u32>(0xFu, 0xF00u, 0xF0000u, 0xF000000u)));
    }
    // The top nibble is shifted down: masked in place it would be negative as an i32.
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(v & 0xF0u, v & 0xF000u, v & 0xF00000u, v >> 28u)));
}

fn quad_scale(t: u32) -> vec4<f32> {
    if WTYPE == Q8_0 {
        return vec4<f32>(exp2(-24.0));
    }
    if t < 4u {
        return vec4<f32>(1.0, exp2(-8.0), exp2(-16.0), exp2(-24.0));
    }
    return vec4<f32>(exp2(-4.0), exp2(-12.0), exp2(-20.0), 1.0);
}

// One 32-element chunk of x as `qmatvec_sg8` uses it: elements 4t .. 4t+4 times
// quad_scale(t) in xs[t], the sum of all 32, and where NORM this invocation's part of the
// sum of squares of a + h (before the norm's scale and weight).
struct XShared {
    xs0: vec4<f32>,
    xs1: vec4<f32>,
    xs2: vec4<f32>,
    xs3: vec4<f32>,
    xs4: vec4<f32>,
    xs5: vec4<f32>,
    xs6: vec4<f32>,
    xs7: vec4<f32>,
    sum: f32,
    sq: f32,
}

// Quarter-row i of x, resid and norm_w, from the uniform copies where X_UNIFORM.
fn x_quarter(i: u32) -> vec4<f32> {
    if X_UNIFORM {
        return x_u[i];
    }
    return x4[i];
}

fn resid_quarter(i: u32) -> vec4<f32> {
    if X_UNIFORM {
        return resid_u[i];
    }
    return resid[i];
}

fn norm_w_quarter(i: u32) -> vec4<f32> {
    if X_UNIFORM {
        return norm_w_u[i];
    }
    return norm_w[i];
}

// Chunk c of x: each of the subgroup's invocations loads a quarter-row and shares it, as in
// `qmatmul_sg8`; where NORM, its quarter-row of a + h times the norm's weight, stored to
// `sum4` where `store`.
fn x_shared(c: u32, lane: u32, store: bool) -> XShared {
    let i = 8u * c + lane;
    var xv = x_quarter(i);
    var sq = 0.0;
    if NORM {
        let s = resid_quarter(i) + xv;
        if store {
            sum4[i] = s;
        }
        sq = dot(s, s);
        xv = s * norm_w_quarter(i);
    }
    let xb0 = subgroupBroadcast(xv, 0u);
    let xb1 = subgroupBroadcast(xv, 1u);
    let xb2 = subgroupBroadcast(xv, 2u);
    let xb3 = subgroupBroadcast(xv, 3u);
    let xb4 = subgroupBroadcast(xv, 4u);
    let xb5 = subgroupBroadcast(xv, 5u);
    let xb6 = subgroupBroadcast(xv, 6u);
    let xb7 = subgroupBroadcast(xv, 7u);
    return XShared(
        xb0 * quad_scale(0u),
        xb1 * quad_scale(1u),
        xb2 * quad_scale(2u),
        xb3 * quad_scale(3u),
        xb4 * quad_scale(4u),
        xb5 * quad_scale(5u),
        xb6 * quad_scale(6u),
        xb7 * quad_scale(7u),
        dot(xb0 + xb1 + xb2 + xb3 + xb4 + xb5 + xb6 + xb7, vec4<f32>(1.0)),
        sq,
    );
}

// Whether this invocation stores its quarter-rows of a + h (SUM): the subgroup holding
// the first invocation of the first workgroup of the first range, so each is stored once.
// Called in uniform control flow.
fn stores_sum(wg: u32, lid: u32) -> bool {
    let first = subgroupAny(lid == 0u);
    return SUM && first && wg == 0u && p.row0 == 0u;
}

// The norm's scale from an invocation's summed squares (1 without NORM). Called in
// uniform control flow.
fn norm_scale(sq: f32) -> f32 {
    if NORM {
        return inverseSqrt(subgroupAdd(sq) / f32(p.k) + p.eps);
    }
    return 1.0;
}

// Stored block b's sum d * sum(q x) + m * sum(x), its quants read here (of weight
// `which`) and its d and m given.
fn block_sum(which: u32, b: u32, dm: vec2<f32>, x: XShared) -> f32 {
    let q = block_quants(which, b);
    return dm.x * (dot(scaled_quad(q, 0u), x.xs0) + dot(scaled_quad(q, 1u), x.xs1) + dot(scaled_quad(q, 2u), x.xs2) + dot(scaled_quad(q, 3u), x.xs3) + dot(scaled_quad(q, 4u), x.xs4) + dot(scaled_quad(q, 5u), x.xs5) + dot(scaled_quad(q, 6u), x.xs6) + dot(scaled_quad(q, 7u), x.xs7)) + dm.y * x.sum;
}

// Values of weight rows j0 .. j0+ROWS: row j0+r in lo[r] (r < 4) or hi[r - 4].
struct RowSums {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

// Chunk c's part of the sums of rows j0 .. j0+ROWS of weight `which`, whose blocks are
// adjacent, so their scales come in one or two loads; each block's affine step is applied
// once to its sums, as quant.wgsl's dots do.
fn row_sums(which: u32, j0: u32, c: u32, x: XShared) -> RowSums {
    var r = RowSums(vec4<f32>(0.0), vec4<f32>(0.0));
    let b = stored_block_in(weight_rows(which), j0, c);
    let sc = load_scales(which, b);
    r.lo.x = block_sum(which, b, block_dm(which, sc, 0u, j0, c), x);
    if ROWS > 1u {
        r.lo.y = block_sum(which, b + 1u, block_dm(which, sc, 1u, j0 + 1u, c), x);
        r.lo.z = block_sum(which, b + 2u, block_dm(which, sc, 2u, j0 + 2u, c), x);
        r.lo.w = block_sum(which, b + 3u, block_dm(which, sc, 3u, j0 + 3u, c), x);
    }
    if ROWS > 4u {
        r.hi.x = block_sum(which, b + 4u, block_dm(which, sc, 4u, j0 + 4u, c), x);
        r.hi.y = block_sum(which, b + 5u, block_dm(which, sc, 5u, j0 + 5u, c), x);
        r.hi.z = block_sum(which, b + 6u, block_dm(which, sc, 6u, j0 + 6u, c), x);
        r.hi.w = block_sum(which, b + 7u, block_dm(which, sc, 7u, j0 + 7u, c), x);
    }
    return r;
}

// Element i of output `which` (out, out2, out3).
fn store_of(which: u32, i: u32, v: f32) {
    if which == 2u {
        out3[i] = v;
    } else if which == 1u {
        out2[i] = v;
    } else {
        out[i] = v;
    }
}

// Rows j0 .. j0+ROWS of output `which`.
fn store_rows(which: u32, j0: u32, v: RowSums) {
    store_of(which, j0, v.lo.x);
    if ROWS > 1u {
        store_of(which, j0 + 1u, v.lo.y);
        store_of(which, j0 + 2u, v.lo.z);
        store_of(which, j0 + 3u, v.lo.w);
    }
    if ROWS > 4u {
        store_of(which, j0 + 4u, v.hi.x);
        store_of(which, j0 + 5u, v.hi.y);
        store_of(which, j0 + 6u, v.hi.z);
        store_of(which, j0 + 7u, v.hi.w);
    }
}

// One token: rows row0 .. row_end of out = dequant(w) x, a multiple of ROWS rows that are
// whole row groups or end at n (so every invocation's blocks are adjacent and aligned).
// Each invocation owns ROWS adjacent weight rows j0 .. j0+ROWS (j0 = row0 + ROWS (MV_WG x +
// lid), the last such block where that passes row_end, computed and not stored).
@compute @workgroup_size(MV_WG, 1, 1)
fn qmatvec_sg8(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let first = p.row0 + (wg.x * MV_WG + lid) * ROWS;
    // Clamped, so that every invocation reaches the subgroup operations.
    let j0 = min(first, p.row_end - ROWS);
    let r = first_weight_rows(j0, lane, stores_sum(wg.x, lid));
    if first < p.row_end {
        store_rows(0u, j0, r);
    }
}

// Rows j0 .. j0+ROWS of the first weight times x; called in uniform control flow.
fn first_weight_rows(j0: u32, lane: u32, store: bool) -> RowSums {
    var acc = RowSums(vec4<f32>(0.0), vec4<f32>(0.0));
    var sq = 0.0;
    for (var c = 0u; c < p.k / 32u; c++) {
        let x = x_shared(c, lane, store);
        sq += x.sq;
        let r = row_sums(0u, j0, c, x);
        acc.lo += r.lo;
        acc.hi += r.hi;
    }
    let scale = norm_scale(sq);
    return RowSums(acc.lo * scale, acc.hi * scale);
}

// silu(v) = v sigmoid(v) per element, as elementwise.wgsl's `swiglu` computes it.
fn silu4(v: vec4<f32>) -> vec4<f32> {
    return v / (vec4<f32>(1.0) + exp(-v));
}

// `qmatvec_sg8` over two weights of one shape, gate (`wq`, `wt`, `factors`) and up (`wq2`,
// `wt2`, `factors2`), storing silu(gate x) * (up x) (x normed as there where NORM): a
// feed-forward's two products and SwiGLU in one dispatch instead of three, each chunk of x
// loaded once for both.
@compute @workgroup_size(MV_WG, 1, 1)
fn qmatvec_swiglu_sg8(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let first = p.row0 + (wg.x * MV_WG + lid) * ROWS;
    let j0 = min(first, p.row_end - ROWS);
    let r = pair_rows(0u, j0, lane, stores_sum(wg.x, lid));
    if first < p.row_end {
        store_rows(0u, j0, RowSums(silu4(r.a.lo) * r.b.lo, silu4(r.a.hi) * r.b.hi));
    }
}

// Rows j0 .. j0+ROWS of weights `which` and `which` + 1 (a literal) times x, each chunk of x
// loaded once for both; called in uniform control flow.
struct PairSums {
    a: RowSums,
    b: RowSums,
}

fn pair_rows(which: u32, j0: u32, lane: u32, store: bool) -> PairSums {
    var a = RowSums(vec4<f32>(0.0), vec4<f32>(0.0));
    var b = RowSums(vec4<f32>(0.0), vec4<f32>(0.0));
    var sq = 0.0;
    for (var c = 0u; c < p.k / 32u; c++) {
        let x = x_shared(c, lane, store);
        sq += x.sq;
        let ra = row_sums(which, j0, c, x);
        a.lo += ra.lo;
        a.hi += ra.hi;
        let rb = row_sums(which + 1u, j0, c, x);
        b.lo += rb.lo;
        b.hi += rb.hi;
    }
    let scale = norm_scale(sq);
    return PairSums(RowSums(a.lo * scale, a.hi * scale), RowSums(b.lo * scale, b.hi * scale));
}

// A decode step's q, k and v products of one x (normed as in `qmatvec_sg8` where NORM) in
// one dispatch instead of three: the first workgroups own q's n rows (weight 0, to `out`),
// the rest k's and v's n2 rows (weights 1 and 2, to `out2` and `out3`, at row `pos` of
// them where ROPE), each invocation the same ROWS rows of both, so x's chunks are loaded
// once for them. n and n2 are multiples of ROWS; which weights a workgroup reads is
// uniform over it, so its subgroup operations stay in uniform control flow.
@compute @workgroup_size(MV_WG, 1, 1)
fn qmatvec_qkv_sg8(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) lane: u32) {
    let q_groups = (p.n + MV_WG * ROWS - 1u) / (MV_WG * ROWS);
    let store = stores_sum(wg.x, lid);
    if wg.x < q_groups {
        let first = (wg.x * MV_WG + lid) * ROWS;
        let j0 = min(first, p.n - ROWS);
        let r = rotated(first_weight_rows(j0, lane, store), j0);
        if first < p.n {
            store_rows(0u, j0, r);
        }
    } else {
        let first = ((wg.x - q_groups) * MV_WG + lid) * ROWS;
        let j0 = min(first, p.n2 - ROWS);
        let r = pair_rows(1u, j0, lane, false);
        if first < p.n2 {
            let at = select(0u, p.pos * p.n2, ROPE) + j0;
            store_rows(1u, at, rotated(r.a, j0));
            store_rows(2u, at, r.b);
        }
    }
}

// Where ROPE, rows j0 .. j0+ROWS of q or k rotated by their angles at position `pos`, as
// rope.wgsl's STYLE 0 (GGUF's pairs (2i, 2i+1) of a head) rotates them: ROWS (4 or 8 here)
// divides head_dim and j0 is a multiple of ROWS, so an invocation's rows lie in one head,
// each pair in one invocation, and their (cos, sin) pairs in one or two of the table's
// vec4s.
fn rotated(v: RowSums, j0: u32) -> RowSums {
    if !ROPE {
        return v;
    }
    let t = (p.pos * p.head_dim + j0 % p.head_dim) / 4u;
    var r = RowSums(rotate2(v.lo, rope4[t]), v.hi);
    if ROWS > 4u {
        r.hi = rotate2(v.hi, rope4[t + 1u]);
    }
    return r;
}

// Pairs (x, y) and (z, w) of v rotated by the angles whose (cos, sin) are cs.xy and cs.zw.
fn rotate2(v: vec4<f32>, cs: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(v.x * cs.x - v.y * cs.y, v.x * cs.y + v.y * cs.x, v.z * cs.z - v.w * cs.w, v.z * cs.w + v.w * cs.z);
}
