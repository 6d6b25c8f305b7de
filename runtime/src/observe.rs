//! Observation of the inputs of every linear layer during a forward pass, for calibration.

pub use mixq_loader::InputSite;

/// Receives linear-layer inputs as `[rows, width]` row-major f32, named by the schema's input site.
pub trait ActivationObserver {
    /// Every token's row at a site (the input of q/k/v, o_proj, the router or lm_head).
    fn tokens(&mut self, site: InputSite, rows: &[f32]);
    /// The rows of the tokens routed to one expert at a routed site (gate/up input, down input).
    fn routed(&mut self, site: InputSite, expert: usize, rows: &[f32]);
}
