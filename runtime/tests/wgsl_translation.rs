//! Every WGSL kernel variant the GPU backend can build parses, validates, and translates to Metal
//! Shading Language (the macOS path) and SPIR-V (the Vulkan path) with naga, the translator wgpu
//! itself uses. No GPU is needed.

use mixq_runtime::gpu::shaders::Kernel;
use naga::back::{msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn translate(kernel: &Kernel) -> Result<(String, usize), String> {
    let src = kernel.source();
    let module = naga::front::wgsl::parse_str(&src).map_err(|e| e.emit_to_string(&src))?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty()).validate(&module).map_err(|e| e.emit_to_string(&src))?;
    let msl_options = msl::Options { lang_version: (2, 4), fake_missing_bindings: true, ..Default::default() };
    let pipeline = msl::PipelineOptions { entry_point: Some((naga::ShaderStage::Compute, "main".into())), ..Default::default() };
    let (metal, _) = msl::write_string(&module, &info, &msl_options, &pipeline).map_err(|e| format!("MSL: {e}"))?;
    let spv_pipeline = spv::PipelineOptions { shader_stage: naga::ShaderStage::Compute, entry_point: "main".into() };
    let words = spv::write_vec(&module, &info, &spv::Options::default(), Some(&spv_pipeline)).map_err(|e| format!("SPIR-V: {e:?}"))?;
    Ok((metal, words.len()))
}

#[test]
fn every_kernel_translates_to_metal_and_spirv() {
    let kernels = Kernel::all();
    let mut failures = Vec::new();
    for k in &kernels {
        match translate(k) {
            Ok((metal, spirv_words)) => {
                assert!(metal.contains("kernel void main_"), "{}: no Metal compute entry point", k.name());
                assert!(spirv_words > 100, "{}: suspiciously small SPIR-V", k.name());
            }
            Err(e) => failures.push(format!("{}:\n{e}", k.name())),
        }
    }
    assert!(failures.is_empty(), "{} of {} kernels failed:\n{}", failures.len(), kernels.len(), failures.join("\n"));
}
