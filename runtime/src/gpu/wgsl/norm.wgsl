// RMSNorm per token: y = x * rsqrt(mean(x^2) + eps) * w.

struct NormParams {
    width: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(1) var<uniform> np: NormParams;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> x: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> sums: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let base = wid.x * np.width;
    var acc = 0.0;
    for (var i = li; i < np.width; i += 256u) {
        let v = x[base + i];
        acc += v * v;
    }
    sums[li] = acc;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride = stride / 2u) {
        if (li < stride) {
            sums[li] += sums[li + stride];
        }
        workgroupBarrier();
    }
    let r = 1.0 / sqrt(sums[0] / f32(np.width) + np.eps);
    for (var i = li; i < np.width; i += 256u) {
        y[base + i] = x[base + i] * r * weight[i];
    }
}
