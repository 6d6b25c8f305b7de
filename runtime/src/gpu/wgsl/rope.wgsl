// Rotary embedding of q (in place) and k, and the store of k and v into the layer's KV cache.
// cos/sin come from a table computed on the CPU, so positions rotate exactly as there.

struct RopeParams {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    capacity: u32,   // cache slots; position p lives in slot p % capacity
    mscale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(1) var<uniform> rp: RopeParams;
@group(0) @binding(2) var<storage, read> table: array<f32>;   // [position, half, 2] (cos, sin)
@group(0) @binding(3) var<storage, read_write> q: array<f32>;
@group(0) @binding(4) var<storage, read> k: array<f32>;
@group(0) @binding(5) var<storage, read> v: array<f32>;
@group(0) @binding(6) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(7) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = rp.head_dim / 2u;
    let heads = rp.heads + rp.kv_heads;
    let i = gid.x % half;
    let head = (gid.x / half) % heads;
    let t = gid.x / (half * heads);
    if (t >= step.tokens) {
        return;
    }
    let pos = step.pos0 + t;
    let cs = table[(pos * half + i) * 2u];
    let sn = table[(pos * half + i) * 2u + 1u];
    if (head < rp.heads) {
        let at = (t * rp.heads + head) * rp.head_dim + i;
        let u = q[at] * rp.mscale;
        let w = q[at + half] * rp.mscale;
        q[at] = u * cs - w * sn;
        q[at + half] = u * sn + w * cs;
    } else {
        let kh = head - rp.heads;
        let at = (t * rp.kv_heads + kh) * rp.head_dim + i;
        let u = k[at] * rp.mscale;
        let w = k[at + half] * rp.mscale;
        let slot = ((pos % rp.capacity) * rp.kv_heads + kh) * rp.head_dim + i;
        k_cache[slot] = u * cs - w * sn;
        k_cache[slot + half] = u * sn + w * cs;
        v_cache[slot] = v[at];
        v_cache[slot + half] = v[at + half];
    }
}
