// Rotary position embedding over rows row0 .. row0 + n_tokens of x [rows, n_heads, head_dim]
// into the same rows of out; the token in row row0 + t sits at position pos0 + t.
// CPU reference: runtime/src/backend/cpu.rs `rope`.
// The (cos, sin) table is computed on the host (`rope_table`), so the kernel needs no
// transcendental functions and rope scaling lives in one place. STYLE: 0 pairs
// (x[2i], x[2i+1]) (GGUF Llama), 1 pairs (x[i], x[i + d/2]) (Hugging Face).

struct Params {
    n_tokens: u32,
    n_heads: u32,
    head_dim: u32,
    pos0: u32,
    row0: u32,
}

override STYLE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// One invocation per rotated pair.
@compute @workgroup_size(64, 1, 1)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let half = p.head_dim / 2u;
    let per_token = p.n_heads * half;
    let t = idx / per_token;
    if t >= p.n_tokens {
        return;
    }
    let h = (idx % per_token) / half;
    let i = idx % half;
    let cs = (p.pos0 + t) * p.head_dim + 2u * i;
    let c = table[cs];
    let s = table[cs + 1u];
    let base = ((p.row0 + t) * p.n_heads + h) * p.head_dim;
    var i0 = base + 2u * i;
    var i1 = i0 + 1u;
    if STYLE == 1u {
        i0 = base + i;
        i1 = i0 + half;
    }
    let x0 = x[i0];
    let x1 = x[i1];
    out[i0] = x0 * c - x1 * s;
    out[i1] = x0 * s + x1 * c;
}
