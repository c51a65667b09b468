// f32 matrix multiplication: out[m,n] = op(a)[m,k] * op(b)[k,n].
// CPU reference: runtime/src/backend/cpu.rs `matmul`.
//
// Two entry points:
// - `matmul`: any layout (TA / TB transpose flags as override constants, so the
//   backward-pass forms a^T*b and a*b^T are separate specialised pipelines); each
//   invocation computes a 4x4 block of out.
// - `matmul8`: the same products (TA / TB too) when k % 4 == 0, n % 8 == 0 and, with TA,
//   m % 8 == 0; each invocation computes an 8x8 block from vec4 loads and 4x4 matrix
//   products, with no arrays (indexed private arrays spill to memory on lavapipe). Register blocking without workgroup memory is what
//   runs fast on CPU-emulated GPUs (lavapipe), where barriers are very slow.
// Workgroup (8, 8): x walks column blocks, y walks row blocks.

struct Params {
    m: u32,
    k: u32,
    n: u32,
    _pad: u32,
}

override TA: bool = false;
override TB: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> out4: array<vec4<f32>>;

fn load_a(i: u32, kk: u32) -> f32 {
    if i >= p.m {
        return 0.0;
    }
    if TA {
        return a[kk * p.m + i];
    }
    return a[i * p.k + kk];
}

fn load_b(kk: u32, j: u32) -> f32 {
    if j >= p.n {
        return 0.0;
    }
    if TB {
        return b[j * p.k + kk];
    }
    return b[kk * p.n + j];
}

@compute @workgroup_size(8, 8, 1)
fn matmul(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i0 = gid.y * 4u;
    let j0 = gid.x * 4u;
    if i0 >= p.m || j0 >= p.n {
        return;
    }
    var acc: array<vec4<f32>, 4>;
    for (var kk = 0u; kk < p.k; kk++) {
        let bv = vec4<f32>(load_b(kk, j0), load_b(kk, j0 + 1u), load_b(kk, j0 + 2u), load_b(kk, j0 + 3u));
        acc[0] += load_a(i0, kk) * bv;
        acc[1] += load_a(i0 + 1u, kk) * bv;
        acc[2] += load_a(i0 + 2u, kk) * bv;
        acc[3] += load_a(i0 + 3u, kk) * bv;
    }
    for (var r = 0u; r < 4u; r++) {
        let i = i0 + r;
        if i < p.m {
            for (var c = 0u; c < 4u; c++) {
                if j0 + c < p.n {
                    out[i * p.n + j0 + c] = acc[r][c];
                }
            }
        }
    }
}

// Row i of out, columns j0 .. j0+8, if the row exists.
fn store8(i: u32, j0: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if i < p.m {
        let o = (i * p.n + j0) / 4u;
        out4[o] = lo;
        out4[o + 1u] = hi;
    }
}

// Four consecutive vec4s of a row-major matrix, `stride` vec4s apart, as matrix columns.
fn cols4(src_is_a: bool, at: u32, stride: u32) -> mat4x4<f32> {
    if src_is_a {
        return mat4x4<f32>(a4[at], a4[at + stride], a4[at + 2u * stride], a4[at + 3u * stride]);
    }
    return mat4x4<f32>(b4[at], b4[at + stride], b4[at + 2u * stride], b4[at + 3u * stride]);
}

@compute @workgroup_size(8, 8, 1)
fn matmul8(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i0 = gid.y * 8u;
    let j0 = gid.x * 8u;
    if i0 >= p.m || j0 >= p.n {
        return;
    }
    // Rows past m are clamped to the last row and their results discarded.
    let last = p.m - 1u;
    let k4 = p.k / 4u;
    let m4 = p.m / 4u;
    let n4 = p.n / 4u;
    var c00 = vec4<f32>(0.0);
    var c01 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0);
    var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0);
    var c21 = vec4<f32>(0.0);
    var c30 = vec4<f32>(0.0);
    var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0);
    var c41 = vec4<f32>(0.0);
    var c50 = vec4<f32>(0.0);
    var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0);
    var c61 = vec4<f32>(0.0);
    var c70 = vec4<f32>(0.0);
    var c71 = vec4<f32>(0.0);
    for (var kq = 0u; kq < k4; kq++) {
        // x_r: row r of the block of op(a), over k = 4kq .. 4kq+4.
        var x0: vec4<f32>;
        var x1: vec4<f32>;
        var x2: vec4<f32>;
        var x3: vec4<f32>;
        var x4: vec4<f32>;
        var x5: vec4<f32>;
        var x6: vec4<f32>;
        var x7: vec4<f32>;
        if TA {
            let lo = transpose(cols4(true, 4u * kq * m4 + i0 / 4u, m4));
            let hi = transpose(cols4(true, 4u * kq * m4 + i0 / 4u + 1u, m4));
            x0 = lo[0];
            x1 = lo[1];
            x2 = lo[2];
            x3 = lo[3];
            x4 = hi[0];
            x5 = hi[1];
            x6 = hi[2];
            x7 = hi[3];
        } else {
            x0 = a4[min(i0 + 0u, last) * k4 + kq];
            x1 = a4[min(i0 + 1u, last) * k4 + kq];
            x2 = a4[min(i0 + 2u, last) * k4 + kq];
            x3 = a4[min(i0 + 3u, last) * k4 + kq];
            x4 = a4[min(i0 + 4u, last) * k4 + kq];
            x5 = a4[min(i0 + 5u, last) * k4 + kq];
            x6 = a4[min(i0 + 6u, last) * k4 + kq];
            x7 = a4[min(i0 + 7u, last) * k4 + kq];
        }
        // b0, b1: the 4x4 blocks of op(b) for k = 4kq .. 4kq+4 and columns j0 .. j0+8,
        // with k along the matrix columns, so that b * x_r accumulates a row of out.
        var b0: mat4x4<f32>;
        var b1: mat4x4<f32>;
        if TB {
            b0 = transpose(cols4(false, j0 * k4 + kq, k4));
            b1 = transpose(cols4(false, (j0 + 4u) * k4 + kq, k4));
        } else {
            b0 = cols4(false, 4u * kq * n4 + j0 / 4u, n4);
            b1 = cols4(false, 4u * kq * n4 + j0 / 4u + 1u, n4);
        }
        c00 += b0 * x0;
        c01 += b1 * x0;
        c10 += b0 * x1;
        c11 += b1 * x1;
        c20 += b0 * x2;
        c21 += b1 * x2;
        c30 += b0 * x3;
        c31 += b1 * x3;
        c40 += b0 * x4;
        c41 += b1 * x4;
        c50 += b0 * x5;
        c51 += b1 * x5;
        c60 += b0 * x6;
        c61 += b1 * x6;
        c70 += b0 * x7;
        c71 += b1 * x7;
    }
    store8(i0 + 0u, j0, c00, c01);
    store8(i0 + 1u, j0, c10, c11);
    store8(i0 + 2u, j0, c20, c21);
    store8(i0 + 3u, j0, c30, c31);
    store8(i0 + 4u, j0, c40, c41);
    store8(i0 + 5u, j0, c50, c51);
    store8(i0 + 6u, j0, c60, c61);
    store8(i0 + 7u, j0, c70, c71);
}
