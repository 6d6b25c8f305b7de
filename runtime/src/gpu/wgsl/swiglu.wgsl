// SwiGLU-OAI on the routed experts' gate and up outputs (biases already added):
// (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit). Written over gate.

struct GluParams {
    width: u32,   // intermediate size
    slots: u32,
    limit: f32,
    alpha: f32,
}

@group(0) @binding(1) var<uniform> gp: GluParams;
@group(0) @binding(2) var<storage, read_write> gate: array<f32>;
@group(0) @binding(3) var<storage, read> up: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= step.tokens * gp.slots * gp.width) {
        return;
    }
    let g = min(gate[i], gp.limit);
    let u = clamp(up[i], -gp.limit, gp.limit);
    gate[i] = (u + 1.0) * (g / (1.0 + exp(-gp.alpha * g)));
}
