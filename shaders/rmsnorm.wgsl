// RMSNorm: out[r,:] = x[r,:] / sqrt(mean(x[r,:]^2) + eps) * weight.
// CPU reference: runtime/src/backend/cpu.rs `rmsnorm`.
// One invocation per row: CPU-emulated GPUs run workgroup reductions slowly, and the
// rows of a transformer (hundreds to a few thousand elements) are short.

struct Params {
    rows: u32,
    dim: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn rmsnorm(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if r >= p.rows {
        return;
    }
    let base = r * p.dim;
    var ss = 0.0;
    for (var i = 0u; i < p.dim; i++) {
        let v = x[base + i];
        ss += v * v;
    }
    let inv = 1.0 / sqrt(ss / f32(p.dim) + p.eps);
    for (var i = 0u; i < p.dim; i++) {
        out[base + i] = x[base + i] * inv * weight[i];
    }
}

// add_rmsnorm (CPU reference: cpu.rs `Op::AddRmsNorm`): a residual add and the norm after
// it, sum = x + hn, then hn = rmsnorm(sum) * weight over the addend's own rows. One
// invocation per row, as above; each element of hn is read before it is overwritten.
@group(0) @binding(5) var<storage, read_write> hn: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn add_rmsnorm(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if r >= p.rows {
        return;
    }
    let base = r * p.dim;
    var ss = 0.0;
    for (var i = 0u; i < p.dim; i++) {
        let v = x[base + i] + hn[base + i];
        out[base + i] = v;
        ss += v * v;
    }
    let inv = 1.0 / sqrt(ss / f32(p.dim) + p.eps);
    for (var i = 0u; i < p.dim; i++) {
        hn[base + i] = out[base + i] * inv * weight[i];
    }
}

// The input gradient with the weight frozen: dx = r w dy - x r^3 mean(w dy x), with
// r = 1 / sqrt(mean(x^2) + eps); dy in `dy`, dx in `out`. CPU reference:
// runtime/src/backend/grad.rs `rmsnorm_grad`. One invocation per row, as above.
@group(0) @binding(4) var<storage, read> dy: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn rmsnorm_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if r >= p.rows {
        return;
    }
    let base = r * p.dim;
    var ss = 0.0;
    var wgx = 0.0;
    for (var i = 0u; i < p.dim; i++) {
        let v = x[base + i];
        ss += v * v;
        wgx += weight[i] * dy[base + i] * v;
    }
    let inv = 1.0 / sqrt(ss / f32(p.dim) + p.eps);
    let c = inv * inv * inv * (wgx / f32(p.dim));
    for (var i = 0u; i < p.dim; i++) {
        out[base + i] = inv * weight[i] * dy[base + i] - x[base + i] * c;
    }
}
