//! `mixq publish`: verify a converted model, then upload it to the hub.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use mixq_loader::hub_upload::UploadTarget;
use mixq_loader::source::HubSettings;

use crate::args::{Json, Quiet};
use crate::progress::CountProgress;
use crate::report::print_json;

/// Where a model is published: the flags `publish` and `convert --upload-repo` share.
#[derive(clap::Args, Debug, Clone)]
pub struct HubTarget {
    /// Create the repo private (an existing repo keeps its visibility).
    #[arg(long)]
    pub private: bool,
    /// The branch to commit to (default: main; created when missing).
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// The commit message (default: "Upload DIR with mixq VERSION").
    #[arg(long)]
    pub commit_message: Option<String>,
}

/// Arguments of `mixq publish`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  HF_TOKEN=hf_... mixq publish gpt-oss-120b-mlx-3.6bit --repo me/gpt-oss-120b-mlx-3.6bit\n\n\
The hub is HF_ENDPOINT (default https://huggingface.co); the token is HF_TOKEN, else the one `huggingface-cli login` stored (HF_TOKEN_PATH, default HF_HOME/token). A failed part is retried; a re-run sends only the large (LFS) files the hub lacks.")]
pub struct PublishArgs {
    /// The converted model folder (it must pass `mixq verify`).
    dir: PathBuf,
    /// The hub repo to upload to, owner/name (created when missing).
    #[arg(long, value_parser = crate::args::repo_id)]
    repo: String,
    #[command(flatten)]
    target: HubTarget,
    #[command(flatten)]
    quiet: Quiet,
    #[command(flatten)]
    json: Json,
}

/// Runs `mixq publish`.
pub fn run(a: PublishArgs) -> Result<ExitCode> {
    let quiet = a.quiet.quiet || a.json.json;
    let report = upload(&a.dir, &a.repo, &a.target, quiet)?;
    if a.json.json {
        print_json(&serde_json::json!({
            "repo": a.repo, "revision": a.target.revision, "files": report.files, "lfs_sent": report.lfs_sent,
            "lfs_skipped": report.lfs_skipped, "bytes_sent": report.bytes_sent, "commit_url": report.commit_url,
        }));
    } else if !a.quiet.quiet {
        println!(
            "published {} to {} ({}): {} files, {} large file(s) sent, {} already on the hub{}",
            a.dir.display(),
            a.repo,
            a.target.revision,
            report.files,
            report.lfs_sent,
            report.lfs_skipped,
            report.commit_url.map(|u| format!("; {u}")).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Verifies and uploads `dir` to `repo`, with byte progress on stderr unless `quiet`.
pub fn upload(dir: &Path, repo: &str, t: &HubTarget, quiet: bool) -> Result<mixq_loader::hub_upload::UploadReport> {
    let message = t.commit_message.clone().unwrap_or_else(|| {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        format!("Upload {name} with mixq {}", env!("CARGO_PKG_VERSION"))
    });
    let target = UploadTarget { repo: repo.to_string(), private: t.private, revision: t.revision.clone(), message };
    let progress = CountProgress::new("publish", "bytes", quiet);
    let total = mixq_quantizer::writer::publish::folder_bytes(dir) as usize;
    let done = std::sync::Mutex::new((String::new(), 0usize, 0usize));
    let report = mixq_quantizer::writer::publish::publish(dir, &target, &HubSettings::from_env(), &|file, sent, _| {
        let mut d = done.lock().unwrap_or_else(|e| e.into_inner());
        if d.0 != file {
            // A new file: what the last one sent counts as finished.
            d.1 += d.2;
            d.0 = file.to_string();
        }
        d.2 = sent as usize;
        progress.update((d.1 + d.2).min(total), total);
    });
    progress.finish();
    Ok(report?)
}
