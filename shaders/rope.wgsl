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
    n_kv_heads: u32, // rope_kv only
}

override STYLE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// The elements of pair i of the head starting at `base`, in STYLE's pairing.
fn pair(base: u32, i: u32) -> vec2<u32> {
    if STYLE == 1u {
        return vec2<u32>(base + i, base + i + p.head_dim / 2u);
    }
    return vec2<u32>(base + 2u * i, base + 2u * i + 1u);
}

// (x0, x1) rotated by pair i's angle at position `pos`.
fn rotate(x0: f32, x1: f32, pos: u32, i: u32) -> vec2<f32> {
    let cs = pos * p.head_dim + 2u * i;
    let c = table[cs];
    let s = table[cs + 1u];
    return vec2<f32>(x0 * c - x1 * s, x0 * s + x1 * c);
}

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
    let e = pair(((p.row0 + t) * p.n_heads + h) * p.head_dim, i);
    let r = rotate(x[e.x], x[e.y], p.pos0 + t, i);
    out[e.x] = r.x;
    out[e.y] = r.y;
}

// rope_kv (CPU reference: cpu.rs `Op::RopeKv`, that is `rope` and copies): q in x, rotated
// into out; k rotated into k_cache and v copied into v_cache, both at row pos0 on.
@group(0) @binding(4) var<storage, read> k: array<f32>;
@group(0) @binding(5) var<storage, read> v: array<f32>;
@group(0) @binding(6) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(7) var<storage, read_write> v_cache: array<f32>;

// One invocation per rotated pair of q, then of k, then per two values of v.
@compute @workgroup_size(64, 1, 1)
fn rope_kv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 64u;
    let half = p.head_dim / 2u;
    let q_pairs = p.n_tokens * p.n_heads * half;
    let kv_pairs = p.n_tokens * p.n_kv_heads * half;
    let cache0 = p.pos0 * p.n_kv_heads * p.head_dim;
    if idx < q_pairs {
        let t = idx / (p.n_heads * half);
        let i = idx % half;
        let e = pair((idx / half) * p.head_dim, i);
        let r = rotate(x[e.x], x[e.y], p.pos0 + t, i);
        out[e.x] = r.x;
        out[e.y] = r.y;
    } else if idx < q_pairs + kv_pairs {
        let j = idx - q_pairs;
        let t = j / (p.n_kv_heads * half);
        let i = j % half;
        let e = pair((j / half) * p.head_dim, i);
        let r = rotate(k[e.x], k[e.y], p.pos0 + t, i);
        k_cache[cache0 + e.x] = r.x;
        k_cache[cache0 + e.y] = r.y;
    } else if idx < q_pairs + 2u * kv_pairs {
        let j = 2u * (idx - q_pairs - kv_pairs);
        v_cache[cache0 + j] = v[j];
        v_cache[cache0 + j + 1u] = v[j + 1u];
    }
}
