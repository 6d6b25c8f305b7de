//! Calibration statistics on the GPU: where each input site's sums live in a session's statistics
//! buffer, and one window's sums read back from it.

use mixq_loader::{GptOssConfig, InputSite};

/// Which sums an observing session accumulates besides Σ x² per channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObserveOptions {
    /// Σ x xᵀ at every site but the experts' down input, over every token.
    pub hessians: bool,
    /// Σ x xᵀ per expert at the routed sites, over the rows routed to it.
    pub expert_hessians: bool,
}

/// One site's sums in the statistics buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    /// The input site.
    pub(crate) site: InputSite,
    /// Rows counted per expert (a routed site) or every token's row.
    pub(crate) routed: bool,
    /// Σ x xᵀ (true) or Σ x² (false).
    pub(crate) gram: bool,
    /// Channels.
    pub(crate) width: usize,
    /// Experts (routed) or 1.
    pub(crate) blocks: usize,
    /// First entry of the sums.
    pub(crate) offset: usize,
    /// First entry of the per-expert row counts (routed Σ x²).
    pub(crate) count_offset: usize,
}

impl Slot {
    /// Entries of the sums.
    pub(crate) fn len(&self) -> usize {
        self.blocks * if self.gram { self.width * self.width } else { self.width }
    }
}

/// Every slot of a model's statistics buffer and its length in f32 entries.
#[derive(Debug, Clone)]
pub(crate) struct ObservePlan {
    pub(crate) slots: Vec<Slot>,
    pub(crate) len: usize,
}

impl ObservePlan {
    /// The slots `opts` asks for, as the CPU observer sees the sites: Σ x² over every token at
    /// each site but the experts' down input, Σ x² per expert at the routed sites, and the Gram
    /// matrices asked for.
    pub(crate) fn new(c: &GptOssConfig, opts: ObserveOptions) -> Self {
        let mut plan = ObservePlan { slots: Vec::new(), len: 0 };
        let e = c.num_local_experts;
        for site in InputSite::all(c) {
            let width = site.width(c);
            let every_token = !matches!(site, InputSite::ExpertDown(_));
            let mut kinds = Vec::new();
            if every_token {
                kinds.push((false, false));
                if opts.hessians {
                    kinds.push((false, true));
                }
            }
            if site.is_routed() {
                kinds.push((true, false));
                if opts.expert_hessians {
                    kinds.push((true, true));
                }
            }
            for (routed, gram) in kinds {
                let blocks = if routed { e } else { 1 };
                let mut slot = Slot { site, routed, gram, width, blocks, offset: plan.len, count_offset: 0 };
                plan.len += slot.len();
                if routed && !gram {
                    slot.count_offset = plan.len;
                    plan.len += e;
                }
                plan.slots.push(slot);
            }
        }
        plan
    }

    /// The slots observing `site`'s rows (`routed`: per expert).
    pub(crate) fn at(&self, site: InputSite, routed: bool) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(move |s| s.site == site && s.routed == routed)
    }

    /// Splits a read-back statistics buffer of a window of `tokens` tokens into its sites' sums.
    pub(crate) fn window(&self, data: &[f32], tokens: usize) -> WindowStats {
        let mut out = WindowStats { tokens: tokens as u64, ..Default::default() };
        for s in &self.slots {
            let sums = data[s.offset..s.offset + s.len()].to_vec();
            match (s.routed, s.gram) {
                (false, false) => out.squares.push((s.site, sums)),
                (false, true) => out.hessians.push((s.site, sums)),
                (true, false) => {
                    let counts = data[s.count_offset..s.count_offset + s.blocks].iter().map(|&n| n as u64).collect();
                    out.routed_squares.push((s.site, sums, counts));
                }
                (true, true) => out.expert_hessians.push((s.site, sums)),
            }
        }
        out
    }
}

/// The f32 sums of one window, as read back from the device.
#[derive(Debug, Clone, Default)]
pub struct WindowStats {
    /// Tokens in the window (the rows of every token site).
    pub tokens: u64,
    /// Site → Σ x² per channel over every token.
    pub squares: Vec<(InputSite, Vec<f32>)>,
    /// Routed site → Σ x² per expert and channel (`[experts * width]`), rows per expert.
    pub routed_squares: Vec<(InputSite, Vec<f32>, Vec<u64>)>,
    /// Site → Σ x xᵀ over every token (`[width * width]`, row-major).
    pub hessians: Vec<(InputSite, Vec<f32>)>,
    /// Routed site → Σ x xᵀ per expert (`[experts * width * width]`).
    pub expert_hessians: Vec<(InputSite, Vec<f32>)>,
}
