// Row-wise softmax of x [rows, cols], subtracting the row maximum first.
// CPU reference: runtime/src/backend/cpu.rs `softmax`. One invocation per row.

struct Params {
    rows: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn softmax(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * 64u;
    if r >= p.rows {
        return;
    }
    let base = r * p.cols;
    var mx = x[base];
    for (var i = 1u; i < p.cols; i++) {
        mx = max(mx, x[base + i]);
    }
    var sum = 0.0;
    for (var i = 0u; i < p.cols; i++) {
        let e = exp(x[base + i] - mx);
        out[base + i] = e;
        sum += e;
    }
    for (var i = 0u; i < p.cols; i++) {
        out[base + i] = out[base + i] / sum;
    }
}
