//! Row indexing of stacked matrices, which reads the gate (even) or up (odd) rows of upstream
//! interleaved experts in place.

/// Maps logical row `r` to stored row `(r / per) * src_per + start + (r % per) * step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMap {
    /// Logical rows per block (per expert).
    pub per: usize,
    /// Stored rows per block.
    pub src_per: usize,
    /// First stored row within a block.
    pub start: usize,
    /// Stride between stored rows.
    pub step: usize,
}

impl RowMap {
    /// The identity map.
    pub fn identity(rows: usize) -> Self {
        RowMap { per: rows.max(1), src_per: rows.max(1), start: 0, step: 1 }
    }

    /// The stored row holding logical row `r`.
    #[inline]
    pub fn stored(&self, r: usize) -> usize {
        (r / self.per) * self.src_per + self.start + (r % self.per) * self.step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_interleaved_rows() {
        let m = RowMap { per: 2, src_per: 4, start: 1, step: 2 };
        assert_eq!((0..4).map(|r| m.stored(r)).collect::<Vec<_>>(), vec![1, 3, 5, 7]);
        assert_eq!(RowMap::identity(3).stored(2), 2);
    }
}
