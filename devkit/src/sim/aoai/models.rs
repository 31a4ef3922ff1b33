//! Deployments and the models behind them: which operations a deployment serves.
//!
//! A deployment is declared `name=model` (`fwdproxy-dev --deployments emb=text-embedding-3-small`),
//! as an operator names deployments freely in Azure; the *model* decides what it serves, and
//! any other operation gets AOAI's own `OperationNotSupported`. A name declared without a model,
//! or any name when no list is declared, is taken as its own model name (operators often name a
//! deployment after its model), which is only a guess.

use serde_json::{json, Value};

/// One deployment of a simulated resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub name: String,
    /// The model it runs (`gpt-4o`, `text-embedding-3-small`, `dall-e-3`, `tts-1`, `whisper`…).
    pub model: String,
}

impl Deployment {
    /// A deployment named after its model.
    pub fn named(name: &str) -> Self {
        Deployment {
            name: name.to_string(),
            model: name.to_string(),
        }
    }
}

impl std::str::FromStr for Deployment {
    type Err = String;
    /// `name` or `name=model`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, model) = match s.split_once('=') {
            Some((n, m)) => (n.trim(), m.trim()),
            None => (s.trim(), s.trim()),
        };
        let ok = |v: &str| {
            (1..=64).contains(&v.len())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !ok(name) || !ok(model) {
            return Err(format!(
                "deployment {s:?}: want NAME or NAME=MODEL, each 1-64 of A-Z a-z 0-9 - _ ."
            ));
        }
        Ok(Deployment {
            name: name.to_string(),
            model: model.to_string(),
        })
    }
}

/// Parse a comma-separated `--deployments` value; names must be unique.
pub fn parse_list(list: &str) -> Result<Vec<Deployment>, String> {
    let mut out: Vec<Deployment> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let d: Deployment = item.parse()?;
        if out.iter().any(|o| o.name == d.name) {
            return Err(format!("deployment {:?} is declared twice", d.name));
        }
        out.push(d);
    }
    if out.is_empty() {
        return Err("--deployments needs at least one name".into());
    }
    Ok(out)
}

/// What a model can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Chat completions and responses (`gpt-4o`, `o3-mini`, …).
    Chat { reasoning: bool },
    /// Legacy completions only (`gpt-35-turbo-instruct`, `davinci-002`).
    Completion,
    Embedding {
        native_dims: usize,
        shortenable: bool,
    },
    /// `images/generations` (`dall-e-3`: url or b64_json; `gpt-image-1`: b64_json only).
    Image { b64_only: bool },
    /// `audio/speech` (`tts-1`, `tts-1-hd`, `gpt-4o-mini-tts`).
    Speech,
    /// `audio/transcriptions` and `audio/translations` (`whisper`, `gpt-4o-transcribe`).
    Transcription,
}

/// The kind of `model` (case-insensitive, by the families AOAI deploys).
pub fn kind(model: &str) -> ModelKind {
    let m = model.to_ascii_lowercase();
    if m.contains("embedding") || m.contains("ada") {
        if m.contains("3-large") {
            ModelKind::Embedding {
                native_dims: 3072,
                shortenable: true,
            }
        } else {
            ModelKind::Embedding {
                native_dims: 1536,
                shortenable: m.contains("3-small") || m.contains("-3"),
            }
        }
    } else if m.starts_with("dall-e") || m.contains("image") {
        ModelKind::Image {
            b64_only: m.contains("gpt-image"),
        }
    } else if m.contains("tts") {
        ModelKind::Speech
    } else if m.contains("whisper") || m.contains("transcribe") {
        ModelKind::Transcription
    } else if m.contains("instruct") || m.starts_with("davinci") || m.starts_with("babbage") {
        ModelKind::Completion
    } else {
        let reasoning = ["o1", "o3", "o4", "gpt-5"].iter().any(|p| m.starts_with(p));
        ModelKind::Chat { reasoning }
    }
}

/// The embedding model's public name, for the `model` field of an answer.
pub fn embedding_model_name(model: &str) -> &'static str {
    let m = model.to_ascii_lowercase();
    if m.contains("3-large") {
        "text-embedding-3-large"
    } else if m.contains("3-small") || m.contains("-3") {
        "text-embedding-3-small"
    } else {
        "text-embedding-ada-002"
    }
}

/// An entry of `GET /openai/v1/models`.
pub fn model_entry(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_715_000_000, "owned_by": "system"})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_parse_with_or_without_a_model() {
        let list = parse_list("emb=text-embedding-3-small, gpt-4o ,img=dall-e-3").unwrap();
        assert_eq!(
            list,
            vec![
                Deployment {
                    name: "emb".into(),
                    model: "text-embedding-3-small".into()
                },
                Deployment::named("gpt-4o"),
                Deployment {
                    name: "img".into(),
                    model: "dall-e-3".into()
                },
            ]
        );
        for bad in ["", "a=", "=b", "a b=c", "a=b/c", "x,x=gpt-4o", ",,"] {
            assert!(parse_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kinds_follow_model_families() {
        assert_eq!(kind("gpt-4o"), ModelKind::Chat { reasoning: false });
        assert_eq!(kind("o3-mini"), ModelKind::Chat { reasoning: true });
        assert_eq!(kind("gpt-35-turbo-instruct"), ModelKind::Completion);
        assert_eq!(
            kind("text-embedding-3-large"),
            ModelKind::Embedding {
                native_dims: 3072,
                shortenable: true
            }
        );
        assert_eq!(
            kind("text-embedding-ada-002"),
            ModelKind::Embedding {
                native_dims: 1536,
                shortenable: false
            }
        );
        assert_eq!(kind("dall-e-3"), ModelKind::Image { b64_only: false });
        assert_eq!(kind("gpt-image-1"), ModelKind::Image { b64_only: true });
        assert_eq!(kind("tts-1-hd"), ModelKind::Speech);
        assert_eq!(kind("gpt-4o-mini-tts"), ModelKind::Speech);
        assert_eq!(kind("whisper"), ModelKind::Transcription);
        assert_eq!(kind("gpt-4o-transcribe"), ModelKind::Transcription);
        // A short custom name says nothing: only a declaration can make it an embedding model.
        assert_eq!(kind("emb"), ModelKind::Chat { reasoning: false });
    }
}
