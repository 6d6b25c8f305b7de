//! Observation of the inputs of every linear layer during a forward pass, for calibration.

/// Where a dense linear layer's input is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenseSite {
    /// The normed input of q_proj, k_proj and v_proj.
    Qkv,
    /// The attention output entering o_proj.
    AttentionOut,
    /// The normed input of the router (and, per expert, of gate_proj and up_proj).
    Router,
    /// The final-norm hidden state entering lm_head.
    LmHead,
}

/// Where an expert projection's input is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpertSite {
    /// The input of gate_proj and up_proj: the rows of the tokens routed to the expert.
    GateUp,
    /// The activated SwiGLU output entering down_proj.
    Down,
}

/// Receives linear-layer inputs as `[tokens, width]` row-major f32.
pub trait ActivationObserver {
    /// A dense layer's input (`layer` is `None` for lm_head).
    fn dense(&mut self, layer: Option<usize>, site: DenseSite, rows: &[f32]);
    /// One expert's input, for the tokens routed to it.
    fn expert(&mut self, layer: usize, site: ExpertSite, expert: usize, rows: &[f32]);
}
