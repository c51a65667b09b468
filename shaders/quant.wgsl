// Quantised and half-precision weights: dequantisation, embedding gather, and the
// dequantising matrix-vector / matrix-matrix products out = x * dequant(w)^T.
// CPU reference: runtime/src/quant.rs `dequantize`, runtime/src/backend/cpu.rs `qmatmul`, `embed`.
//
// w is n rows of k elements in a GGUF layout, read as raw little-endian bytes from an
// array<u32>. The format is the WTYPE override constant (codes as `WeightType::shader_code`),
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

// Tokens per invocation in `qmatmul`.
const MB: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

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

fn half_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1Fu;
    let man = h & 0x3FFu;
    if e == 0u {
        if man == 0u {
            return bitcast<f32>(sign);
        }
        // Subnormal half: normalise the mantissa so its leading one sits at bit 10.
        let shift = countLeadingZeros(man) - 21u;
        return bitcast<f32>(sign | ((113u - shift) << 23u) | (((man << shift) & 0x3FFu) << 13u));
    }
    if e == 31u {
        return bitcast<f32>(sign | 0x7F800000u | (man << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (man << 13u));
}

fn f16_at(off: u32) -> f32 {
    return half_to_f32(u16_at(off));
}

fn i8_of(v: u32) -> f32 {
    return f32(bitcast<i32>(v << 24u) >> 24u);
}

// Elements 32c .. 32c+32 of the row starting at byte `row`; float rows are zero past k.
fn chunk(row: u32, c: u32, y: ptr<function, array<f32, 32>>) {
    switch WTYPE {
        case F32: {
            for (var i = 0u; i < 32u; i++) {
                let e = 32u * c + i;
                (*y)[i] = select(0.0, bitcast<f32>(w[(row >> 2u) + e]), e < p.k);
            }
        }
        case F16, BF16: {
            for (var i = 0u; i < 32u; i++) {
                let e = 32u * c + i;
                let h = u16_at(row + 2u * e);
                var v = half_to_f32(h);
                if WTYPE == BF16 {
                    v = bitcast<f32>(h << 16u);
                }
                (*y)[i] = select(0.0, v, e < p.k);
            }
        }
        case Q8_0: {
            let off = row + 34u * c;
            let d = f16_at(off);
            for (var i = 0u; i < 8u; i++) {
                let q = u32_at(off + 2u + 4u * i);
                for (var j = 0u; j < 4u; j++) {
                    (*y)[4u * i + j] = d * i8_of(q >> (8u * j));
                }
            }
        }
        case Q4_0, Q4_1: {
            var off = row + 18u * c;
            var m = 0.0;
            if WTYPE == Q4_1 {
                off = row + 20u * c;
                m = f16_at(off + 2u);
            }
            let d = f16_at(off);
            let qs = off + select(2u, 4u, WTYPE == Q4_1);
            for (var i = 0u; i < 4u; i++) {
                let q = u32_at(qs + 4u * i);
                for (var j = 0u; j < 4u; j++) {
                    let lo = f32((q >> (8u * j)) & 0xFu);
                    let hi = f32((q >> (8u * j + 4u)) & 0xFu);
                    if WTYPE == Q4_1 {
                        (*y)[4u * i + j] = d * lo + m;
                        (*y)[4u * i + j + 16u] = d * hi + m;
                    } else {
                        (*y)[4u * i + j] = d * (lo - 8.0);
                        (*y)[4u * i + j + 16u] = d * (hi - 8.0);
                    }
                }
            }
        }
        case Q4_K: {
            let sb = row + 144u * (c / 8u);
            let j = c % 8u;
            let d = f16_at(sb);
            let dmin = f16_at(sb + 2u);
            var sc: u32;
            var mn: u32;
            if j < 4u {
                sc = byte_at(sb + 4u + j) & 63u;
                mn = byte_at(sb + 8u + j) & 63u;
            } else {
                sc = (byte_at(sb + 8u + j) & 0xFu) | ((byte_at(sb + j) >> 6u) << 4u);
                mn = (byte_at(sb + 8u + j) >> 4u) | ((byte_at(sb + 4u + j) >> 6u) << 4u);
            }
            let d1 = d * f32(sc);
            let m1 = dmin * f32(mn);
            let qs = sb + 16u + 32u * (j / 2u);
            let shift = 4u * (j % 2u);
            for (var i = 0u; i < 8u; i++) {
                let q = u32_at(qs + 4u * i);
                for (var b = 0u; b < 4u; b++) {
                    (*y)[4u * i + b] = d1 * f32((q >> (8u * b + shift)) & 0xFu) - m1;
                }
            }
        }
        case Q6_K: {
            let sb = row + 210u * (c / 8u);
            let sub = c % 8u;
            let h = sub / 4u;
            let g = sub % 4u;
            let d = f16_at(sb + 208u);
            let ql = sb + 64u * h + 32u * (g % 2u);
            let qh = sb + 128u + 32u * h;
            let lshift = 4u * (g / 2u);
            for (var i = 0u; i < 8u; i++) {
                let lo4 = u32_at(ql + 4u * i);
                let hi4 = u32_at(qh + 4u * i);
                for (var b = 0u; b < 4u; b++) {
                    let l = 4u * i + b;
                    let s = d * i8_of(byte_at(sb + 192u + 8u * h + l / 16u + 2u * g));
                    let lo = (lo4 >> (8u * b + lshift)) & 0xFu;
                    let hi = (hi4 >> (8u * b + 2u * g)) & 3u;
                    (*y)[l] = s * f32(i32(lo | (hi << 4u)) - 32);
                }
            }
        }
        default: {}
    }
}

fn n_chunks() -> u32 {
    return (p.k + 31u) / 32u;
}

// One invocation per 32-element chunk of a single row of k elements.
@compute @workgroup_size(64, 1, 1)
fn dequant(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if c >= n_chunks() {
        return;
    }
    var y: array<f32, 32>;
    chunk(0u, c, &y);
    for (var i = 0u; i < 32u; i++) {
        let e = 32u * c + i;
        if e < p.k {
            out[e] = y[i];
        }
    }
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
    var y: array<f32, 32>;
    let id = ids[t];
    if id < p.n {
        chunk(id * p.row_bytes, c, &y);
    }
    for (var i = 0u; i < 32u; i++) {
        let e = 32u * c + i;
        if e < p.k {
            out[t * p.k + e] = y[i];
        }
    }
}

// One token: one invocation per weight row.
@compute @workgroup_size(64, 1, 1)
fn qmatvec(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = gid.x + gid.y * nwg.x * 64u;
    if j >= p.n {
        return;
    }
    let row = j * p.row_bytes;
    var acc = 0.0;
    var y: array<f32, 32>;
    for (var c = 0u; c < n_chunks(); c++) {
        chunk(row, c, &y);
        let xo = 32u * c;
        for (var i = 0u; i < 32u; i++) {
            if xo + i < p.k {
                acc += y[i] * x[xo + i];
            }
        }
    }
    out[j] = acc;
}

// Several tokens: one invocation per (weight row, group of MB tokens), so each chunk is
// dequantised once and used MB times. x: gid.x walks rows, gid.y token groups.
@compute @workgroup_size(64, 1, 1)
fn qmatmul(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let t0 = gid.y * MB;
    if j >= p.n || t0 >= p.m {
        return;
    }
    let row = j * p.row_bytes;
    var acc: array<f32, MB>;
    var y: array<f32, 32>;
    for (var c = 0u; c < n_chunks(); c++) {
        chunk(row, c, &y);
        let xo = 32u * c;
        for (var t = 0u; t < MB; t++) {
            let tok = min(t0 + t, p.m - 1u);
            for (var i = 0u; i < 32u; i++) {
                if xo + i < p.k {
                    acc[t] += y[i] * x[tok * p.k + xo + i];
                }
            }
        }
    }
    for (var t = 0u; t < MB; t++) {
        if t0 + t < p.m {
            out[(t0 + t) * p.n + j] = acc[t];
        }
    }
}
