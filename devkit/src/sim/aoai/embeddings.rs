//! Embeddings: deterministic unit vectors of the model's dimension, `dimensions` honoured the
//! way OpenAI shortens text-embedding-3 vectors, `encoding_format: base64` as little-endian f32.

use super::*;

pub(super) fn plan_embeddings(at: &Deployed<'_>, body: &Value) -> Result<Plan, Reject> {
    let ModelKind::Embedding {
        native_dims,
        shortenable,
    } = at.kind
    else {
        return Err(operation_not_supported("embeddings", at.model));
    };
    // Inputs as (text used for the vector, token count).
    let one = |v: &Value| -> Option<(String, usize)> {
        match v {
            Value::String(s) if !s.is_empty() => Some((s.clone(), tokens::count(s))),
            Value::Array(ids) if !ids.is_empty() && ids.iter().all(Value::is_u64) => {
                Some((v.to_string(), ids.len()))
            }
            _ => None,
        }
    };
    let input = body.get("input").unwrap_or(&Value::Null);
    let inputs: Vec<(String, usize)> = match input {
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            vec![(input.to_string(), items.len())]
        }
        Value::Array(items) if !items.is_empty() => {
            let parsed: Option<Vec<_>> = items.iter().map(one).collect();
            parsed.ok_or_else(|| {
                invalid_request::<Reject>("'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.", "input")
            })?
        }
        v => vec![one(v).ok_or_else(|| {
            invalid_request::<Reject>("'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.", "input")
        })?],
    };
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(invalid_request(
            &format!("Too many inputs. The max number of inputs is {MAX_EMBEDDING_INPUTS}."),
            "input",
        ));
    }
    let dims = match body.get("dimensions") {
        None | Some(Value::Null) => native_dims,
        Some(_) if !shortenable => {
            return Err(invalid_request(
                "This model does not support specifying dimensions.",
                "dimensions",
            ))
        }
        Some(v) => match v.as_u64() {
            Some(d) if d >= 1 && d as usize <= native_dims => d as usize,
            _ => {
                return Err(invalid_request(
                    &format!("Invalid 'dimensions': must be between 1 and {native_dims}."),
                    "dimensions",
                ))
            }
        },
    };
    let base64 = match body.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return Err(invalid_request(
                "Invalid 'encoding_format': expected 'float' or 'base64'.",
                "encoding_format",
            ))
        }
    };
    let family = models::embedding_model_name(at.model);
    let prompt_tokens: usize = inputs.iter().map(|(_, n)| n).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, (text, _))| {
            let v = embedding(family, text, native_dims, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64_encode(&bytes))
            } else {
                Value::Array(v.iter().map(|x| json!(x)).collect())
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Plan::Embeddings {
        body: json!({"object": "list", "data": data, "model": family,
                     "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}),
        prompt_tokens,
    })
}

/// The deterministic unit vector of `text`: `native` dimensions from a seeded generator, cut to
/// `dims` and re-normalised (how OpenAI shortens text-embedding-3 vectors).
pub fn embedding(model: &str, text: &str, native: usize, dims: usize) -> Vec<f32> {
    let mut rng = SplitMix(stable_hash(&[model.as_bytes(), text.as_bytes()]));
    let full: Vec<f64> = (0..native).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
    let cut = &full[..dims.min(native)];
    let norm = cut
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    cut.iter().map(|x| (x / norm) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_deterministic_unit_vectors_and_shorten_like_openai() {
        let a = embedding("m", "hello", 1536, 1536);
        assert_eq!(a, embedding("m", "hello", 1536, 1536));
        assert_ne!(a, embedding("m", "hello!", 1536, 1536));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
        // Shortened = the first d native components, re-normalised: same direction.
        let short = embedding("m", "hello", 1536, 256);
        assert_eq!(short.len(), 256);
        let scale = short[0] / a[0];
        assert!(short
            .iter()
            .zip(&a)
            .all(|(s, f)| (s - f * scale).abs() < 1e-4));
    }
}
