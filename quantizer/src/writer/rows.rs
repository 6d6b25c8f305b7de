//! Row access to source tensors: BF16 rows (optionally strided, for de-interleaving) and MXFP4
//! expert rows (optionally de-interleaved), decoded one row at a time.

use mixq_loader::decode::{bf16_to_f32, mxfp4_row_to_f32};
use mixq_loader::format::MXFP4_BLOCK;
use mixq_loader::{Checkpoint, RowMap};

use crate::error::ConvertError;
use mixq_loader::schema::{Param, UpstreamRows};

/// Where the rows of one output parameter come from.
#[derive(Debug, Clone, Copy)]
pub enum RowSource<'a> {
    /// BF16 elements: output row `r`, element `j` is source element `r*src_cols + start + j*step`.
    Bf16 {
        /// Source bytes.
        data: &'a [u8],
        /// Output row length.
        cols: usize,
        /// Source row length.
        src_cols: usize,
        /// First source column.
        start: usize,
        /// Column stride.
        step: usize,
    },
    /// MXFP4 expert rows: output row `r` is source row `map.stored(r)`.
    Mxfp4 {
        /// `[experts, src_rows, cols/32, 16]` bytes.
        blocks: &'a [u8],
        /// `[experts, src_rows, cols/32]` bytes.
        scales: &'a [u8],
        /// Row length in elements.
        cols: usize,
        /// Output row to source row.
        map: RowMap,
    },
}

impl<'a> RowSource<'a> {
    /// The rows of `p` (in the MLX module's order) in the upstream checkpoint `ckpt`, where the
    /// schema says they are; each tensor checked against the dtype and shape it must have.
    pub fn for_param(ckpt: &'a Checkpoint, p: &Param) -> Result<Self, ConvertError> {
        let cols = p.in_features();
        let expected = p.upstream_tensors();
        let fetch = |k: usize| -> Result<&'a [u8], ConvertError> {
            let e = &expected[k];
            let t = ckpt.tensor(&e.name)?;
            t.expect(e.dtype, &e.shape)?;
            Ok(t.data)
        };
        Ok(match &p.upstream {
            UpstreamRows::Bf16 { .. } => RowSource::Bf16 { data: fetch(0)?, cols, src_cols: cols, start: 0, step: 1 },
            UpstreamRows::Bf16Strided { start, step, .. } => {
                RowSource::Bf16 { data: fetch(0)?, cols, src_cols: cols * step, start: *start, step: *step }
            }
            UpstreamRows::Mxfp4 { map, .. } => RowSource::Mxfp4 { blocks: fetch(0)?, scales: fetch(1)?, cols, map: *map },
        })
    }

    /// The source byte slices this reads from.
    pub fn slices(&self) -> Vec<&[u8]> {
        match *self {
            RowSource::Bf16 { data, .. } => vec![data],
            RowSource::Mxfp4 { blocks, scales, .. } => vec![blocks, scales],
        }
    }

    /// The source bytes that output rows `first..first + n` read, where they are contiguous
    /// (all but the strided BF16 expert biases, which are small), for releasing once consumed.
    pub fn row_slices(&self, first: usize, n: usize) -> Vec<&'a [u8]> {
        if n == 0 {
            return Vec::new();
        }
        match *self {
            RowSource::Bf16 { data, src_cols, step: 1, .. } => vec![&data[first * src_cols * 2..(first + n) * src_cols * 2]],
            RowSource::Bf16 { .. } => Vec::new(),
            RowSource::Mxfp4 { blocks, scales, cols, map } => {
                // Stored rows grow with output rows, so the chunk reads one stored range.
                let (lo, hi) = (map.stored(first), map.stored(first + n - 1) + 1);
                let (bb, sb) = (cols / 2, cols / MXFP4_BLOCK);
                vec![&blocks[lo * bb..hi * bb], &scales[lo * sb..hi * sb]]
            }
        }
    }

    /// Output row length in elements.
    pub fn cols(&self) -> usize {
        match *self {
            RowSource::Bf16 { cols, .. } | RowSource::Mxfp4 { cols, .. } => cols,
        }
    }

    /// Source bytes read per output row (for progress).
    pub fn source_bytes_per_row(&self) -> usize {
        match *self {
            RowSource::Bf16 { cols, .. } => cols * 2,
            RowSource::Mxfp4 { cols, .. } => cols / 2 + cols / MXFP4_BLOCK,
        }
    }

    fn mxfp4_row(&self, r: usize) -> (&[u8], &[u8]) {
        let RowSource::Mxfp4 { blocks, scales, cols, map } = *self else {
            unreachable!("mxfp4_row on a BF16 source")
        };
        let src = map.stored(r);
        let (bb, sb) = (cols / 2, cols / MXFP4_BLOCK);
        (&blocks[src * bb..(src + 1) * bb], &scales[src * sb..(src + 1) * sb])
    }

    /// Decodes output row `r` to f32.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match *self {
            RowSource::Bf16 { data, cols, src_cols, start, step } => {
                let base = r * src_cols + start;
                if step == 1 {
                    bf16_to_f32(&data[base * 2..(base + cols) * 2], out);
                } else {
                    for (j, o) in out.iter_mut().enumerate() {
                        let k = (base + j * step) * 2;
                        *o = f32::from_bits(u32::from(u16::from_le_bytes([data[k], data[k + 1]])) << 16);
                    }
                }
            }
            RowSource::Mxfp4 { .. } => {
                let (b, s) = self.mxfp4_row(r);
                mxfp4_row_to_f32(b, s, out);
            }
        }
    }

    /// Writes output row `r` as BF16 bytes (exact: MXFP4 values are representable in bf16).
    pub fn row_bf16(&self, r: usize, scratch: &mut [f32], out: &mut [u8]) {
        if let RowSource::Bf16 { data, cols, src_cols, start, step: 1 } = *self {
            let base = (r * src_cols + start) * 2;
            out.copy_from_slice(&data[base..base + cols * 2]);
            return;
        }
        self.row_f32(r, scratch);
        for (o, v) in out.chunks_exact_mut(2).zip(scratch.iter()) {
            o.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
        }
    }

    /// Copies output row `r`'s MXFP4 blocks and scales unchanged; `None` for a BF16 source.
    pub fn row_mxfp4(&self, r: usize) -> Option<(&[u8], &[u8])> {
        matches!(self, RowSource::Mxfp4 { .. }).then(|| self.mxfp4_row(r))
    }
}
