//! The check that a source gpt-oss checkpoint (upstream MXFP4 or transformers' dense layout) holds
//! exactly the tensors its config implies.

use crate::checkpoint::Checkpoint;
use crate::error::{LoaderError, Result};
use crate::format::MXFP4_BLOCK;
use crate::schema::{source_tensors, SourceLayout};

/// Checks that an upstream checkpoint holds exactly the tensors its config implies.
pub fn validate_upstream(ckpt: &Checkpoint) -> Result<()> {
    validate_source(ckpt, SourceLayout::Mxfp4)
}

/// Checks that a checkpoint of `layout` holds exactly the tensors its config implies, each of the
/// dtype and shape its role needs (a mislabelled tensor is named with the shape expected).
pub fn validate_source(ckpt: &Checkpoint, layout: SourceLayout) -> Result<()> {
    let c = ckpt.config();
    let mxfp4 = if layout == SourceLayout::Mxfp4 { MXFP4_BLOCK } else { 1 };
    for (what, n) in [("hidden_size", c.hidden_size), ("intermediate_size", c.intermediate_size)] {
        if n % mxfp4 != 0 {
            return Err(LoaderError::Config {
                path: c.path.clone(),
                message: format!("`{what}` ({n}) must be a multiple of {MXFP4_BLOCK} for MXFP4 experts"),
            });
        }
    }
    let expected = source_tensors(c, layout);
    for e in &expected {
        ckpt.tensor(&e.name)?.expect(e.dtype, &e.shape)?;
    }
    let names: std::collections::HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    if let Some(extra) = ckpt.names().find(|n| !names.contains(n)) {
        return Err(LoaderError::tensor(extra, "is not part of the gpt-oss layout for this config"));
    }
    Ok(())
}
