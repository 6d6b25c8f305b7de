// x[t] = row `tokens[t]` of the embedding, decoded.

@group(0) @binding(5) var<storage, read> tokens: array<u32>;
@group(0) @binding(6) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= step.tokens * p.cols) {
        return;
    }
    let t = i / p.cols;
    let col = i % p.cols;
    let s = stored_row(tokens[t]);
    if (in_part(s)) {
        x[i] = decode_value(s - p.part_first, col);
    }
}
