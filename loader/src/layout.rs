//! The check that an upstream gpt-oss checkpoint holds exactly the tensors its config implies.

use crate::checkpoint::Checkpoint;
use crate::error::{LoaderError, Result};
use crate::format::MXFP4_BLOCK;
use crate::schema::upstream_tensors;

/// Checks that an upstream checkpoint holds exactly the tensors its config implies.
pub fn validate_upstream(ckpt: &Checkpoint) -> Result<()> {
    let c = ckpt.config();
    for (what, n) in [("hidden_size", c.hidden_size), ("intermediate_size", c.intermediate_size)] {
        if n % MXFP4_BLOCK != 0 {
            return Err(LoaderError::Config {
                path: c.path.clone(),
                message: format!("`{what}` ({n}) must be a multiple of {MXFP4_BLOCK} for MXFP4 experts"),
            });
        }
    }
    let expected = upstream_tensors(c);
    for e in &expected {
        ckpt.tensor(&e.name)?.expect(e.dtype, &e.shape)?;
    }
    let names: std::collections::HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    if let Some(extra) = ckpt.names().find(|n| !names.contains(n)) {
        return Err(LoaderError::tensor(extra, "is not part of the gpt-oss layout for this config"));
    }
    Ok(())
}
