// f32 matrix multiplication: out[m,n] = op(a)[m,k] * op(b)[k,n].
// CPU reference: runtime/src/backend/cpu.rs `matmul`.
//
// Two entry points:
// - `matmul`: any layout (TA / TB transpose flags as override constants, so the
//   backward-pass forms a^T*b and a*b^T are separate specialised pipelines); each
//   invocation computes a 4x4 block of out.
// - `matmul_nn8`: a [m,k] and b [k,n] row-major with n % 8 == 0; each invocation computes
//   an 8x8 block from vec4 loads of b. Register blocking without workgroup memory is what
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

@compute @workgroup_size(8, 8, 1)
fn matmul_nn8(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i0 = gid.y * 8u;
    let j0 = gid.x * 8u;
    if i0 >= p.m || j0 >= p.n {
        return;
    }
    // Rows past m are clamped to the last row and their results discarded.
    let last = p.m - 1u;
    var acc: array<vec4<f32>, 16>;
    let n4 = p.n / 4u;
    for (var kk = 0u; kk < p.k; kk++) {
        let b0 = b4[kk * n4 + j0 / 4u];
        let b1 = b4[kk * n4 + j0 / 4u + 1u];
        for (var r = 0u; r < 8u; r++) {
            let av = a[min(i0 + r, last) * p.k + kk];
            acc[2u * r] += av * b0;
            acc[2u * r + 1u] += av * b1;
        }
    }
    for (var r = 0u; r < 8u; r++) {
        let i = i0 + r;
        if i < p.m {
            let o = i * p.n + j0;
            for (var c = 0u; c < 4u; c++) {
                out[o + c] = acc[2u * r][c];
                out[o + 4u + c] = acc[2u * r + 1u][c];
            }
        }
    }
}
