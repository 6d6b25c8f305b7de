//! Text in and out: tokenizer.json through the `tokenizers` crate, the chat template rendered as
//! Hugging Face renders it (Jinja with `trim_blocks`/`lstrip_blocks` and Python string methods),
//! and the end-of-sequence ids of generation_config.json.

use std::path::Path;

use serde_json::Value;

use crate::error::{Result, RuntimeError};

/// Tokenizer, chat template and stop ids of a checkpoint.
pub struct TextCodec {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    /// Ids that end generation.
    pub eos_ids: Vec<u32>,
}

fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|n| n as u32)).collect(),
        _ => Vec::new(),
    }
}

fn read_json(path: &Path) -> Option<Value> {
    std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok())
}

impl TextCodec {
    /// Loads tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(RuntimeError::Text(format!("{}: missing; the model has no tokenizer", path.display())));
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| RuntimeError::Text(format!("{}: not a valid tokenizer: {e}", path.display())))?;
        let tok_cfg = read_json(&dir.join("tokenizer_config.json")).unwrap_or(Value::Null);
        let chat_template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(t) => Some(t),
            Err(_) => match tok_cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(str::to_string),
                _ => None,
            },
        };
        let mut eos_ids = ids(read_json(&dir.join("generation_config.json")).as_ref().and_then(|g| g.get("eos_token_id")));
        if eos_ids.is_empty() {
            eos_ids = ids(read_json(&dir.join("config.json")).as_ref().and_then(|c| c.get("eos_token_id")));
        }
        let eos_token = token_text(tok_cfg.get("eos_token"));
        if eos_ids.is_empty() {
            eos_ids.extend(tokenizer.token_to_id(&eos_token));
        }
        Ok(TextCodec { tokenizer, chat_template, bos_token: token_text(tok_cfg.get("bos_token")), eos_token, eos_ids })
    }

    /// Token ids of a text (special tokens written in the text are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| RuntimeError::Text(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of token ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, false).map_err(|e| RuntimeError::Text(format!("detokenizing: {e}")))
    }

    /// Whether the checkpoint has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `(role, content)` messages with the chat template, ending with the assistant prompt.
    pub fn render_chat(&self, messages: &[(&str, &str)]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| RuntimeError::Text("the model has no chat template (chat_template.jinja or tokenizer_config.json)".into()))?;
        render_template(template, messages, &self.bos_token, &self.eos_token)
    }
}

/// Renders a Hugging Face chat template with minijinja, configured as transformers configures Jinja.
pub fn render_template(template: &str, messages: &[(&str, &str)], bos: &str, eos: &str) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
    env.add_template("chat", template).map_err(|e| RuntimeError::Text(format!("chat template: {e}")))?;
    let msgs: Vec<minijinja::Value> = messages
        .iter()
        .map(|(role, content)| minijinja::context! { role => *role, content => *content })
        .collect();
    let ctx = minijinja::context! {
        messages => msgs,
        add_generation_prompt => true,
        bos_token => bos,
        eos_token => eos,
    };
    env.get_template("chat")
        .and_then(|t| t.render(ctx))
        .map_err(|e| RuntimeError::Text(format!("rendering the chat template: {e}")))
}

/// The current UTC date and time formatted with the strftime codes chat templates use.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format_time(secs, fmt)
}

/// Formats seconds since the epoch (UTC) with `%Y %m %d %H %M %S %B %b %%`.
pub fn format_time(secs: u64, fmt: &str) -> String {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(ch) = chars.next() {
        if ch != '%' {
            out.push(ch);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_like_strftime() {
        assert_eq!(format_time(0, "%Y-%m-%d %H:%M:%S"), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_795_721_243, "%d %B %Y"), "26 November 2026");
    }

    #[test]
    fn templates_use_python_methods_and_trim_blocks() {
        let t = "{% for m in messages %}\n<|start|>{{ m.role }}<|message|>{{ m.content.strip() }}<|end|>\n{% endfor %}\n{% if add_generation_prompt %}<|start|>assistant{% endif %}";
        let out = render_template(t, &[("user", "  hi  ")], "", "").unwrap();
        assert_eq!(out, "<|start|>user<|message|>hi<|end|>\n<|start|>assistant");
        let e = render_template("{{ raise_exception('no system role') }}", &[], "", "").unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
    }
}
