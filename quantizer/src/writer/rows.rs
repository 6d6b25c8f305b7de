//! Row access to source tensors: float rows (BF16, F16 or F32; optionally strided, for
//! de-interleaving), dense transposed expert columns (transformers' layout, de-interleaved) and
//! MXFP4 expert rows (optionally de-interleaved), decoded one row at a time.

use mixq_loader::decode::{float_at, floats_to_f32, mxfp4_row_to_f32};
use mixq_loader::format::MXFP4_BLOCK;
use mixq_loader::{Checkpoint, FloatDtype, RowMap, SourceLayout};

use crate::error::ConvertError;
use mixq_loader::schema::{Param, UpstreamRows};

/// Where the rows of one output parameter come from.
#[derive(Debug, Clone, Copy)]
pub enum RowSource<'a> {
    /// Float elements: output row `r`, element `j` is source element `r*src_cols + start + j*step`.
    Floats {
        /// Source bytes.
        data: &'a [u8],
        /// Their float type.
        dtype: FloatDtype,
        /// Output row length.
        cols: usize,
        /// Source row length.
        src_cols: usize,
        /// First source column.
        start: usize,
        /// Column stride.
        step: usize,
    },
    /// Dense transposed experts `[experts, cols, src_cols]`: output row `r` (expert `r / per`, row
    /// `o = r % per`), element `j` is source element `[r / per, j, start + o * step]`, a column.
    Dense {
        /// Source bytes.
        data: &'a [u8],
        /// Their float type.
        dtype: FloatDtype,
        /// Output row length (source rows per expert).
        cols: usize,
        /// Source row length (`per * step`).
        src_cols: usize,
        /// Output rows per expert.
        per: usize,
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
    /// The rows of `p` (in the MLX module's order) in the source checkpoint `ckpt` (upstream MXFP4
    /// or transformers' dense layout), where the schema says they are; each tensor checked against
    /// the dtype and shape it must have.
    pub fn for_param(ckpt: &'a Checkpoint, p: &Param) -> Result<Self, ConvertError> {
        let cols = p.in_features();
        let layout = ckpt.format().source_layout().unwrap_or(SourceLayout::Mxfp4);
        let dtype = layout.float_dtype();
        let expected = p.source_tensors(layout);
        let fetch = |k: usize| -> Result<&'a [u8], ConvertError> {
            let e = &expected[k];
            let t = ckpt.tensor(&e.name)?;
            t.expect(e.dtype, &e.shape)?;
            Ok(t.data)
        };
        Ok(match &p.rows_in(layout) {
            UpstreamRows::Bf16 { .. } => RowSource::Floats { data: fetch(0)?, dtype, cols, src_cols: cols, start: 0, step: 1 },
            UpstreamRows::Bf16Strided { start, step, .. } => {
                RowSource::Floats { data: fetch(0)?, dtype, cols, src_cols: cols * step, start: *start, step: *step }
            }
            &UpstreamRows::DenseTransposed { per, start, step, .. } => {
                RowSource::Dense { data: fetch(0)?, dtype, cols, src_cols: per * step, per, start, step }
            }
            UpstreamRows::Mxfp4 { map, .. } => RowSource::Mxfp4 { blocks: fetch(0)?, scales: fetch(1)?, cols, map: *map },
        })
    }

    /// The source byte slices this reads from.
    pub fn slices(&self) -> Vec<&[u8]> {
        match *self {
            RowSource::Floats { data, .. } | RowSource::Dense { data, .. } => vec![data],
            RowSource::Mxfp4 { blocks, scales, .. } => vec![blocks, scales],
        }
    }

    /// The source bytes that output rows `first..first + n` read, where they are contiguous
    /// (all but the strided expert biases, which are small; for dense transposed experts, the
    /// experts these rows finish), for releasing once consumed.
    pub fn row_slices(&self, first: usize, n: usize) -> Vec<&'a [u8]> {
        if n == 0 {
            return Vec::new();
        }
        match *self {
            RowSource::Floats { data, dtype, src_cols, step: 1, .. } => {
                let f = dtype.size();
                vec![&data[first * src_cols * f..(first + n) * src_cols * f]]
            }
            RowSource::Floats { .. } => Vec::new(),
            RowSource::Dense { data, dtype, cols, src_cols, per, .. } => {
                let expert_bytes = cols * src_cols * dtype.size();
                vec![&data[first / per * expert_bytes..(first + n) / per * expert_bytes]]
            }
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
            RowSource::Floats { cols, .. } | RowSource::Dense { cols, .. } | RowSource::Mxfp4 { cols, .. } => cols,
        }
    }

    /// Source bytes read per output row (for progress).
    pub fn source_bytes_per_row(&self) -> usize {
        match *self {
            RowSource::Floats { cols, dtype, .. } | RowSource::Dense { cols, dtype, .. } => cols * dtype.size(),
            RowSource::Mxfp4 { cols, .. } => cols / 2 + cols / MXFP4_BLOCK,
        }
    }

    fn mxfp4_row(&self, r: usize) -> (&[u8], &[u8]) {
        let RowSource::Mxfp4 { blocks, scales, cols, map } = *self else {
            unreachable!("mxfp4_row on a float source")
        };
        let src = map.stored(r);
        let (bb, sb) = (cols / 2, cols / MXFP4_BLOCK);
        (&blocks[src * bb..(src + 1) * bb], &scales[src * sb..(src + 1) * sb])
    }

    /// Decodes output row `r` to f32.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match *self {
            RowSource::Floats { data, dtype, cols, src_cols, start, step } => {
                let base = r * src_cols + start;
                if step == 1 {
                    floats_to_f32(dtype, &data[base * dtype.size()..(base + cols) * dtype.size()], out);
                } else {
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = float_at(dtype, data, base + j * step);
                    }
                }
            }
            RowSource::Dense { data, dtype, cols, src_cols, per, start, step } => {
                // Expert e's rows are contiguous: column `start + o*step` of each of its `cols` rows.
                let base = (r / per) * cols * src_cols + start + (r % per) * step;
                for (j, o) in out.iter_mut().enumerate() {
                    *o = float_at(dtype, data, base + j * src_cols);
                }
            }
            RowSource::Mxfp4 { .. } => {
                let (b, s) = self.mxfp4_row(r);
                mxfp4_row_to_f32(b, s, out);
            }
        }
    }

    /// Writes output row `r` as BF16 bytes: BF16 and MXFP4 values exactly, F16 and F32 ones rounded
    /// to nearest, ties to even (as mlx's `astype(mx.bfloat16)` rounds).
    pub fn row_bf16(&self, r: usize, scratch: &mut [f32], out: &mut [u8]) {
        if let RowSource::Floats { data, dtype: FloatDtype::BF16, cols, src_cols, start, step: 1 } = *self {
            let base = (r * src_cols + start) * 2;
            out.copy_from_slice(&data[base..base + cols * 2]);
            return;
        }
        self.row_f32(r, scratch);
        for (o, v) in out.chunks_exact_mut(2).zip(scratch.iter()) {
            o.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
        }
    }

    /// Copies output row `r`'s MXFP4 blocks and scales unchanged; `None` for a float source.
    pub fn row_mxfp4(&self, r: usize) -> Option<(&[u8], &[u8])> {
        matches!(self, RowSource::Mxfp4 { .. }).then(|| self.mxfp4_row(r))
    }
}
