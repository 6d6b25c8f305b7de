// Per-chunk values every kernel reads: the chunk's size and position, and the sampling state.

struct Step {
    tokens: u32,      // tokens in this chunk
    pos0: u32,        // cache length before the chunk
    seed: u32,        // sampling seed
    counter: u32,     // sampling step
    temperature: f32, // 0: greedy
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> step: Step;
