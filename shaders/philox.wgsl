// Philox4x32-10 (Random123), the integer-only perturbation z, and the two zeroth-order
// kernels built on it: a trainable tensor perturbed on the fly, and the fused multi-seed
// integer update. CPU reference: runtime/src/rng.rs and runtime/src/backend/cpu.rs
// (`Op::ZoWeights`, `Op::ZoAccumulate`); z and the update agree bit for bit on every device.
// WGSL has no 64-bit integers, so the 32x32 -> 64-bit product is built from 16-bit limbs.
// z addressing: key = session key (lo, hi); counter = (element / 2, tensor, seed, purpose);
// even elements use words 0 and 1, odd elements words 2 and 3.

struct Params {
    c0: u32,
    c1: u32,
    c2: u32,
    c3: u32,
    k0: u32,
    k1: u32,
    n: u32,      // blocks for `philox`, elements for the others
    kind: u32,   // z kind: 0 binomial, 1 rademacher
    step: f32,   // zo_weights: the accumulator's unit
    eps: f32,    // zo_weights: the signed perturbation scale
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out_u: array<u32>;
@group(0) @binding(2) var<storage, read_write> out_f: array<f32>;
@group(0) @binding(3) var<storage, read> base: array<f32>;
@group(0) @binding(4) var<storage, read_write> acc: array<i32>;
@group(0) @binding(5) var<storage, read> seeds: array<vec2<u32>>;

// (hi, lo) of the full 64-bit product a * b.
fn mulhilo(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xFFFFu;
    let a1 = a >> 16u;
    let b0 = b & 0xFFFFu;
    let b1 = b >> 16u;
    let ll = a0 * b0;
    let lh = a0 * b1;
    let hl = a1 * b0;
    let hh = a1 * b1;
    let mid = (ll >> 16u) + (lh & 0xFFFFu) + (hl & 0xFFFFu);
    let hi = hh + (lh >> 16u) + (hl >> 16u) + (mid >> 16u);
    return vec2<u32>(hi, a * b);
}

fn philox4x32_10(ctr_in: vec4<u32>, key_in: vec2<u32>) -> vec4<u32> {
    var ctr = ctr_in;
    var key = key_in;
    for (var r = 0u; r < 10u; r++) {
        if r > 0u {
            key = key + vec2<u32>(0x9E3779B9u, 0xBB67AE85u);
        }
        let p0 = mulhilo(0xD2511F53u, ctr.x);
        let p1 = mulhilo(0xCD9E8D57u, ctr.z);
        ctr = vec4<u32>(p1.x ^ ctr.y ^ key.x, p1.y, p0.x ^ ctr.w ^ key.y, p0.y);
    }
    return ctr;
}

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

// out_u[4i .. 4i+4] = philox(counter + (i, 0, 0, 0), key).
@compute @workgroup_size(64, 1, 1)
fn philox(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n {
        return;
    }
    let r = philox4x32_10(vec4<u32>(p.c0 + i, p.c1, p.c2, p.c3), vec2<u32>(p.k0, p.k1));
    out_u[4u * i] = r.x;
    out_u[4u * i + 1u] = r.y;
    out_u[4u * i + 2u] = r.z;
    out_u[4u * i + 3u] = r.w;
}

// out_f[i] = z(element c0 + i) for tensor c1, seed c2, purpose c3.
@compute @workgroup_size(64, 1, 1)
fn perturb_z(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n {
        return;
    }
    // The element index may pass 2^32 (start + i); carry into the pair index by hand.
    let e = p.c0 + i;
    let carry = select(0u, 1u, e < p.c0);
    let pair = (e >> 1u) | (carry << 31u);
    let r = philox4x32_10(vec4<u32>(pair, p.c1, p.c2, p.c3), vec2<u32>(p.k0, p.k1));
    out_f[i] = f32(z4_of(r, e)) * 0.25;
}

// 4z for element e from its Philox block r: an integer in [-32, 32].
fn z4_of(r: vec4<u32>, e: u32) -> i32 {
    var words = r.xy;
    if (e & 1u) == 1u {
        words = r.zw;
    }
    if p.kind == 1u {
        return select(-4, 4, (words.x & 1u) == 1u);
    }
    return i32(countOneBits(words.x) + countOneBits(words.y)) - 32;
}

// out_f[i] = value(base[i], acc[i]) + eps * z(i) for tensor c1, seed c2, purpose c3.
@compute @workgroup_size(64, 1, 1)
fn zo_weights(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n {
        return;
    }
    let r = philox4x32_10(vec4<u32>(i >> 1u, p.c1, p.c2, p.c3), vec2<u32>(p.k0, p.k1));
    // The accumulator in two parts that convert to f32 exactly (see `Op::ZoWeights`).
    let d = acc[i];
    let v = (base[i] + (4096.0 * p.step) * f32(d >> 12u)) + p.step * f32(d & 4095);
    out_f[i] = v + p.eps * (f32(z4_of(r, i)) * 0.25);
}

// acc[i] += sum of coef * 4z(seed, i) over the c0 (seed, coef) pairs, tensor c1, purpose c3.
// WGSL integer arithmetic wraps, as the reference's does.
@compute @workgroup_size(64, 1, 1)
fn zo_accumulate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if i >= p.n {
        return;
    }
    var d = acc[i];
    for (var j = 0u; j < p.c0; j++) {
        let s = seeds[j];
        let r = philox4x32_10(vec4<u32>(i >> 1u, p.c1, s.x, p.c3), vec2<u32>(p.k0, p.k1));
        d += bitcast<i32>(s.y) * z4_of(r, i);
    }
    acc[i] = d;
}
