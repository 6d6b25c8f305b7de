//! Row access to source tensors: float rows (BF16, F16 or F32; optionally strided, for
//! de-interleaving), dense transposed expert columns (transformers' layout, de-interleaved) and
//! MXFP4 expert rows (optionally de-interleaved), decoded a row or a chunk of rows at a time.

use mixq_loader::decode::{float_at, floats_to_f32, mxfp4_row_to_f32};
use rayon::prelude::*;
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
        /// Where the output rows are in them.
        geometry: DenseGeometry,
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
                RowSource::Dense { data: fetch(0)?, geometry: DenseGeometry { dtype, cols, src_cols: per * step, per, start, step } }
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
            RowSource::Dense { data, geometry: DenseGeometry { dtype, cols, src_cols, per, .. } } => {
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
            RowSource::Floats { cols, .. } | RowSource::Dense { geometry: DenseGeometry { cols, .. }, .. } | RowSource::Mxfp4 { cols, .. } => cols,
        }
    }

    /// Source bytes read per output row (for progress).
    pub fn source_bytes_per_row(&self) -> usize {
        match *self {
            RowSource::Floats { cols, dtype, .. } | RowSource::Dense { geometry: DenseGeometry { cols, dtype, .. }, .. } => cols * dtype.size(),
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
            RowSource::Dense { data, ref geometry } => {
                dense_rows(data, geometry, r, out);
            }
            RowSource::Mxfp4 { .. } => {
                let (b, s) = self.mxfp4_row(r);
                mxfp4_row_to_f32(b, s, out);
            }
        }
    }

    /// Decodes output rows `first..first + out.len() / cols` to f32 into `out`, rows in parallel;
    /// dense transposed experts are read block-transposed (`dense_rows`).
    pub fn rows_f32(&self, first: usize, out: &mut [f32]) {
        let cols = self.cols();
        match *self {
            RowSource::Dense { data, ref geometry } => {
                let n = out.len() / cols;
                let task = n.div_ceil(rayon::current_num_threads()).max(DENSE_TASK_ROWS);
                out.par_chunks_mut(task * cols).enumerate().for_each(|(k, part)| {
                    dense_rows(data, geometry, first + k * task, part);
                });
            }
            _ => out.par_chunks_mut(cols).enumerate().for_each(|(i, row)| self.row_f32(first + i, row)),
        }
    }

    /// Writes output rows `first..first + out.len() / (2 * cols)` as BF16 bytes into `out`: BF16
    /// and MXFP4 values exactly, F16 and F32 ones rounded to nearest, ties to even (as mlx's
    /// `astype(mx.bfloat16)` rounds); `scratch` holds the f32 rows where they must be decoded.
    pub fn rows_bf16(&self, first: usize, scratch: &mut Vec<f32>, out: &mut [u8]) {
        let cols = self.cols();
        if let RowSource::Floats { data, dtype: FloatDtype::BF16, src_cols, start, step: 1, .. } = *self {
            out.par_chunks_mut(cols * 2).enumerate().for_each(|(i, o)| {
                let base = ((first + i) * src_cols + start) * 2;
                o.copy_from_slice(&data[base..base + cols * 2]);
            });
            return;
        }
        scratch.resize(out.len() / 2, 0.0);
        self.rows_f32(first, scratch);
        out.par_chunks_mut(2).zip(scratch.par_iter()).for_each(|(o, v)| o.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes()));
    }

    /// The float type of a float source (`None` for MXFP4 rows).
    pub fn float_dtype(&self) -> Option<FloatDtype> {
        match *self {
            RowSource::Floats { dtype, .. } | RowSource::Dense { geometry: DenseGeometry { dtype, .. }, .. } => Some(dtype),
            RowSource::Mxfp4 { .. } => None,
        }
    }

    /// Copies output row `r`'s MXFP4 blocks and scales unchanged; `None` for a float source.
    pub fn row_mxfp4(&self, r: usize) -> Option<(&[u8], &[u8])> {
        matches!(self, RowSource::Mxfp4 { .. }).then(|| self.mxfp4_row(r))
    }
}

/// Output rows one task of [`RowSource::rows_f32`] decodes at least (dense experts).
const DENSE_TASK_ROWS: usize = 16;
/// Source rows read per tile by [`dense_rows`].
const DENSE_TILE_ROWS: usize = 64;

/// Where a dense transposed expert tensor `[experts, cols, src_cols]` keeps the output rows.
#[derive(Debug, Clone, Copy)]
pub struct DenseGeometry {
    /// The source's float type.
    pub dtype: FloatDtype,
    /// Output row length (source rows per expert).
    pub cols: usize,
    /// Source row length (`per * step`).
    pub src_cols: usize,
    /// Output rows per expert.
    pub per: usize,
    /// First source column.
    pub start: usize,
    /// Column stride.
    pub step: usize,
}

/// Decodes output rows `first..first + out.len() / cols` of a dense transposed expert tensor,
/// block-transposed: for each expert the rows touch, a tile of source rows is read, each row's
/// needed column range contiguously, and transposed in memory into the output rows. Memory is
/// one tile (`DENSE_TILE_ROWS` x the column range), and the source is read front to back.
fn dense_rows(data: &[u8], g: &DenseGeometry, first: usize, out: &mut [f32]) {
    let (cols, size) = (g.cols, g.dtype.size());
    let n = out.len() / cols;
    let mut tile = Vec::new();
    let mut done = 0;
    while done < n {
        let r = first + done;
        let (expert, o0) = (r / g.per, r % g.per);
        let take = (g.per - o0).min(n - done);
        // Source columns start + o*step for o in o0..o0+take: one contiguous range per source row.
        let (lo, width) = (g.start + o0 * g.step, (take - 1) * g.step + 1);
        let expert_base = expert * cols * g.src_cols;
        for j0 in (0..cols).step_by(DENSE_TILE_ROWS) {
            let rows = DENSE_TILE_ROWS.min(cols - j0);
            tile.resize(rows * width, 0.0);
            for (jj, t) in tile.chunks_exact_mut(width).enumerate() {
                let at = expert_base + (j0 + jj) * g.src_cols + lo;
                floats_to_f32(g.dtype, &data[at * size..(at + width) * size], t);
            }
            for o in 0..take {
                let dst = &mut out[(done + o) * cols + j0..][..rows];
                for (jj, d) in dst.iter_mut().enumerate() {
                    *d = tile[jj * width + o * g.step];
                }
            }
        }
        done += take;
    }
}
