// Optimiser steps over one trainable tensor, in PyTorch's order of operations (torch.optim
// AdamW and SGD, single-tensor path), each value updated in place by its own invocation.
// CPU reference: runtime/src/backend/grad.rs `adamw`, `sgd`.

struct Params {
    n: u32,
    lr: f32,
    beta1: f32,      // momentum for sgd
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bias1: f32,      // 1 - beta1^t
    bias2_sqrt: f32, // sqrt(1 - beta2^t)
    grad_scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

@compute @workgroup_size(64, 1, 1)
fn adamw(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n {
        return;
    }
    let g = grad[i] * p.grad_scale;
    let w = param[i] * (1.0 - p.lr * p.weight_decay);
    let mi = m[i] + (1.0 - p.beta1) * (g - m[i]);
    let vi = v[i] * p.beta2 + (1.0 - p.beta2) * g * g;
    let denom = sqrt(vi) / p.bias2_sqrt + p.eps;
    param[i] = w - (p.lr / p.bias1) * (mi / denom);
    m[i] = mi;
    v[i] = vi;
}

// m is the momentum buffer; beta1 the momentum.
@compute @workgroup_size(64, 1, 1)
fn sgd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n {
        return;
    }
    let g = grad[i] * p.grad_scale + p.weight_decay * param[i];
    let b = p.beta1 * m[i] + g;
    m[i] = b;
    param[i] = param[i] - p.lr * b;
}
