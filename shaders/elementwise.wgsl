// Elementwise kernels over n f32 values: add, a bias added to every row, columns scaled,
// scale, the SwiGLU gate silu(a) * b, and a copy between offsets. CPU reference:
// runtime/src/backend/cpu.rs (`Op::Add`, `Op::AddBias`, `Op::MulCols`, `Op::Scale`, `silu`,
// `Op::Copy`).
// One invocation per element; the 2-D grid lifts the 65535-workgroup limit per dimension.

struct Params {
    n: u32,
    alpha: f32,
    src_offset: u32,  // also the row length for `add_bias`
    dst_offset: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

@compute @workgroup_size(64, 1, 1)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i < p.n {
        out[i] = a[i] + b[i];
    }
}

// out = a + b[i % cols], cols in src_offset.
@compute @workgroup_size(64, 1, 1)
fn add_bias(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i < p.n {
        out[i] = a[i] + b[i % p.src_offset];
    }
}

// out = a * b[i % cols], cols in src_offset (IA3).
@compute @workgroup_size(64, 1, 1)
fn mul_cols(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i < p.n {
        out[i] = a[i] * b[i % p.src_offset];
    }
}

@compute @workgroup_size(64, 1, 1)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i < p.n {
        out[i] = p.alpha * a[i];
    }
}

@compute @workgroup_size(64, 1, 1)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i < p.n {
        let g = a[i];
        out[i] = g / (1.0 + exp(-g)) * b[i];
    }
}

// Moves 32-bit words bit for bit (f32 or u32 alike).
@compute @workgroup_size(64, 1, 1)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i < p.n {
        out[p.dst_offset + i] = a[p.src_offset + i];
    }
}

// The gradients of swiglu: out = dgate = dy * b * sig * (1 + a (1 - sig)), out2 = dup =
// dy * silu(a), with a = gate, b = up and sig = sigmoid(a). CPU reference:
// runtime/src/backend/grad.rs `swiglu_grad`.
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> out2: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn swiglu_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i < p.n {
        let g = a[i];
        let sig = 1.0 / (1.0 + exp(-g));
        out[i] = dy[i] * b[i] * sig * (1.0 + g * (1.0 - sig));
        out2[i] = dy[i] * (g / (1.0 + exp(-g)));
    }
}

// out[c] = sum over rows of a[r, c] * b[r, c] (IA3's scale gradient), n = rows, cols in
// src_offset; one invocation per column, rows summed in order as the reference does
// (runtime/src/backend/grad.rs `col_dot`).
@compute @workgroup_size(64, 1, 1)
fn col_dot(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = index(gid, nwg);
    let cols = p.src_offset;
    if c < cols {
        var s = 0.0;
        for (var r = 0u; r < p.n; r++) {
            s += a[r * cols + c] * b[r * cols + c];
        }
        out[c] = s;
    }
}

// out += alpha * a: gradients summed in place.
@compute @workgroup_size(64, 1, 1)
fn axpy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i < p.n {
        out[i] = out[i] + p.alpha * a[i];
    }
}
