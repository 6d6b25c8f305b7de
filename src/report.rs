//! Human tables and JSON objects for the CLI's results.

pub use mixq_quantizer::sizes::thousands;
use mixq_quantizer::sizes::{gb, gib};
use mixq_quantizer::writer::inspect::Inspection;
use mixq_quantizer::recipe::plan::SourceSize;
use mixq_quantizer::writer::jobs::Plan;
use mixq_quantizer::writer::on_disk::OnDisk;
use mixq_quantizer::writer::verify::VerifyReport;
use serde_json::{json, Value};

/// Size figures as JSON.
fn size_json(bytes: usize, params: usize) -> Value {
    json!({
        "bytes": bytes,
        "gb": gb(bytes),
        "gib": gib(bytes),
        "parameters": params,
        "bits_per_weight": mixq_loader::bits_per_weight(bytes, params),
    })
}

/// A source checkpoint's size figures as JSON, with its layout.
fn source_json(s: SourceSize) -> Value {
    let mut v = size_json(s.bytes, s.params);
    v["layout"] = json!(s.layout.describe());
    v
}

/// The converted files' sizes on disk as JSON.
pub fn on_disk_json(d: &OnDisk) -> Value {
    json!({
        "bytes": d.total(),
        "gb": gb(d.total() as usize),
        "gib": gib(d.total() as usize),
        "shards": d.shards,
        "shard_count": d.shard_count,
        "headers": d.headers,
        "index": d.index,
        "config": d.config,
        "copied": d.copied,
        "copied_bytes": d.copied_bytes(),
        "copied_known": d.copied_known,
        "card_at_most": d.card,
        "manifest_at_most": d.manifest,
    })
}

/// The on-disk line of the plan: the total and each kind of file.
pub fn on_disk_text(d: &OnDisk) -> String {
    let copied = if d.copied_known { "copied tokenizer files" } else { "copied files found beside the config (a bare config: others not counted)" };
    format!(
        "on disk: {} bytes ({:.2} GiB) at most: {} shard(s) {} incl. headers {}, index {}, config {}, {copied} {}, card <= {}, manifest <= {}\n",
        thousands(d.total() as usize),
        gib(d.total() as usize),
        d.shard_count,
        thousands(d.shards as usize),
        thousands(d.headers as usize),
        thousands(d.index as usize),
        thousands(d.config as usize),
        thousands(d.copied_bytes() as usize),
        thousands(d.card as usize),
        thousands(d.manifest as usize),
    )
}

/// The plan as a JSON object.
pub fn plan_json(source: &str, plan: &Plan) -> Value {
    let (recipe, s, source_size) = (&plan.recipe, &plan.summary, plan.source_size);
    let rows: Vec<Value> = s
        .rows
        .iter()
        .map(|r| {
            json!({
                "bits": r.bits_label(),
                "group_size": r.group_label(),
                "action": r.action.to_string(),
                "parameters": r.params,
                "percent": 100.0 * r.params as f64 / s.params as f64,
                "bytes": r.bytes,
                "covers": r.covers(s.num_layers),
            })
        })
        .collect();
    json!({
        "source": source,
        "recipe": recipe.name,
        "rows": rows,
        "total": size_json(s.bytes, s.params),
        "on_disk": on_disk_json(&plan.on_disk),
        "source_checkpoint": source_json(source_size),
    })
}

/// The plan as a table.
pub fn plan_text(source: &str, plan: &Plan) -> String {
    let (recipe, s, source_size) = (&plan.recipe, &plan.summary, plan.source_size);
    let mut out = format!("plan: {source} ({} layers) with recipe {}\n\n", s.num_layers, recipe.name);
    out.push_str(&format!("{:<6} {:>5} {:>17} {:>8} {:>17}  {}\n", "bits", "group", "parameters", "%", "bytes", "covers"));
    for r in &s.rows {
        out.push_str(&format!(
            "{:<6} {:>5} {:>17} {:>7.2}% {:>17}  {}\n",
            r.bits_label(),
            r.group_label(),
            thousands(r.params),
            100.0 * r.params as f64 / s.params as f64,
            thousands(r.bytes),
            r.covers(s.num_layers)
        ));
    }
    out.push_str(&format!(
        "{:<6} {:>5} {:>17} {:>7.2}% {:>17}\n\n",
        "total",
        "",
        thousands(s.params),
        100.0,
        thousands(s.bytes)
    ));
    out.push_str(&format!(
        "converted: {} bytes = {:.2} GB = {:.2} GiB, {:.3} bits per weight\n",
        thousands(s.bytes),
        gb(s.bytes),
        gib(s.bytes),
        s.bits_per_weight()
    ));
    out.push_str(&on_disk_text(&plan.on_disk));
    let SourceSize { layout, bytes: sb, params: sp } = source_size;
    out.push_str(&format!(
        "source ({}): {} bytes = {:.2} GB = {:.2} GiB, {:.3} bits per weight\n",
        layout.describe(),
        thousands(sb),
        gb(sb),
        gib(sb),
        mixq_loader::bits_per_weight(sb, sp)
    ));
    out
}

/// An inspection as JSON.
pub fn inspect_json(dir: &str, i: &Inspection) -> Value {
    let classes: Vec<Value> = i
        .by_class
        .iter()
        .map(|(c, s)| {
            json!({
                "class": c.map(|c| c.as_str()).unwrap_or("unrecognised"),
                "tensors": s.tensors,
                "bytes": s.bytes,
                "dtypes": s.dtypes,
            })
        })
        .collect();
    json!({
        "path": dir,
        "format": i.format.describe(),
        "layers": i.layers,
        "experts": i.experts,
        "shards": i.shards,
        "tensors": i.tensors,
        "classes": classes,
        "quantization": i.quantization,
        "size": size_json(i.bytes as usize, i.params),
    })
}

/// An inspection as a table.
pub fn inspect_text(dir: &str, i: &Inspection) -> String {
    let mut out = format!(
        "{dir}: {}\n{} layers, {} experts per layer, {} tensors in {} shard(s)\n\n",
        i.format.describe(),
        i.layers,
        i.experts,
        i.tensors,
        i.shards
    );
    out.push_str(&format!("{:<14} {:>8} {:>17}  {}\n", "class", "tensors", "bytes", "dtypes"));
    for (c, s) in &i.by_class {
        let dtypes: Vec<&str> = s.dtypes.iter().map(String::as_str).collect();
        out.push_str(&format!(
            "{:<14} {:>8} {:>17}  {}\n",
            c.map(|c| c.as_str()).unwrap_or("unrecognised"),
            s.tensors,
            thousands(s.bytes as usize),
            dtypes.join(", ")
        ));
    }
    if !i.quantization.is_empty() {
        out.push_str("\nquantized modules:\n");
        for (label, n) in &i.quantization {
            out.push_str(&format!("  {label}: {n}\n"));
        }
    }
    out.push_str(&format!(
        "\nsize: {} bytes = {:.2} GB = {:.2} GiB over {} parameters, {:.3} bits per weight\n",
        thousands(i.bytes as usize),
        gb(i.bytes as usize),
        gib(i.bytes as usize),
        thousands(i.params),
        i.bits_per_weight()
    ));
    out
}

/// A verification as JSON.
pub fn verify_json(dir: &str, r: &VerifyReport) -> Value {
    json!({
        "path": dir,
        "ok": r.ok(),
        "files_checked": r.files_checked,
        "tensors_checked": r.tensors_checked,
        "problems": r.problems,
    })
}

/// A verification as text.
pub fn verify_text(dir: &str, r: &VerifyReport) -> String {
    if r.ok() {
        format!("{dir}: OK ({} files hashed, {} tensors checked against the config)\n", r.files_checked, r.tensors_checked)
    } else {
        let mut out = format!("{dir}: {} problem(s)\n", r.problems.len());
        for p in &r.problems {
            out.push_str(&format!("  {p}\n"));
        }
        out
    }
}

/// Prints one JSON value, pretty, on stdout.
pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON values always serialize"));
}
