//! Chat templates: the Jinja template of `tokenizer_config.json` (`chat_template`, a string or
//! a list of named templates), or `chat_template.jinja` beside it (transformers ≥ 4.43 writes
//! that file), or one given by the operator, rendered with minijinja. Python string methods
//! (`.strip()`, `.startswith()`, ...) that Hugging Face templates use come from
//! minijinja-contrib's pycompat layer, and `raise_exception` is provided.

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;
use serde_json::Value;

use crate::error::{ModelError, Result, read_json};

/// One chat message, as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The folder's template (or `override_text`); `None` when there is none.
    pub fn load(dir: &Path, override_text: Option<String>) -> Result<Option<Self>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            Value::Null
        };
        let from_config = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        let from_file = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
        } else {
            None
        };
        let Some(source) = override_text.or(from_file).or(from_config) else {
            return Ok(None);
        };
        Self::new(
            source,
            token_text(config.get("bos_token")),
            token_text(config.get("eos_token")),
        )
        .map(Some)
    }

    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| ModelError::Unsupported(format!("chat template does not compile: {e}")))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt` is set. A template that raises (wrong role order, say) is the
    /// caller's error.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Unsupported(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ModelError::Input(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + \
        m['content'].strip() + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}\
        {{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_chatml_with_python_string_methods() {
        let t = ChatTemplate::new(CHATML.into(), String::new(), String::new()).unwrap();
        let out = t
            .render(&[msg("system", " Be brief. "), msg("user", "Hi")], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_is_an_input_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}{{ bos_token }}";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(t.render(&[msg("user", "x")], false).unwrap(), "<s>");
        let e = t.render(&[msg("assistant", "x")], false).unwrap_err();
        assert!(matches!(e, ModelError::Input(m) if m.contains("user first")));
    }
}
