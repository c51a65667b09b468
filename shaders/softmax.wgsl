// Row-wise softmax of x [rows, cols], subtracting the row maximum first.
// CPU reference: runtime/src/backend/cpu.rs `softmax`. One invocation per row.

struct Params {
    rows: u32,
    cols: u32,
    scale: f32, // cross_entropy's gradient scale
    _pad: u32,
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

// Cross-entropy of each row of x = logits [rows, cols] against targets[r] (0xFFFFFFFF:
// none, loss and gradient 0): loss[r] = logsumexp(row) - row[target], out = dlogits =
// scale * (softmax(row) - onehot(target)). CPU reference: runtime/src/backend/grad.rs
// `cross_entropy`. One workgroup per row: vocabulary rows are long (tens of thousands),
// so the lanes stride over the row and reduce the maximum and the sum in workgroup memory.
@group(0) @binding(4) var<storage, read> targets: array<u32>;
@group(0) @binding(5) var<storage, read_write> loss: array<f32>;

const CE_WG: u32 = 64u;
var<workgroup> partial: array<f32, CE_WG>;

// The sum (or maximum) of every lane's `v`, returned to every lane.
fn reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var s = CE_WG / 2u; s > 0u; s >>= 1u) {
        if lid < s {
            let o = partial[lid + s];
            partial[lid] = select(partial[lid] + o, max(partial[lid], o), is_max);
        }
        workgroupBarrier();
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(CE_WG, 1, 1)
fn cross_entropy(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = wid.x + wid.y * nwg.x;
    if r >= p.rows {
        return;
    }
    let base = r * p.cols;
    let tgt = targets[r];
    if tgt >= p.cols {
        for (var i = lid; i < p.cols; i += CE_WG) {
            out[base + i] = 0.0;
        }
        if lid == 0u {
            loss[r] = 0.0;
        }
        return;
    }
    var mx = -3.0e38;
    for (var i = lid; i < p.cols; i += CE_WG) {
        mx = max(mx, x[base + i]);
    }
    mx = reduce(lid, mx, true);
    var sum = 0.0;
    for (var i = lid; i < p.cols; i += CE_WG) {
        sum += exp(x[base + i] - mx);
    }
    sum = reduce(lid, sum, false);
    let lse = mx + log(sum);
    for (var i = lid; i < p.cols; i += CE_WG) {
        let one = select(0.0, 1.0, i == tgt);
        out[base + i] = p.scale * (exp(x[base + i] - lse) - one);
    }
    if lid == 0u {
        loss[r] = lse - x[base + tgt];
    }
}
