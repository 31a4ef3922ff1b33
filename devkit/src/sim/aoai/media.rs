//! Images and audio in AOAI's shapes: `images/generations`, `audio/speech`,
//! `audio/transcriptions` and `audio/translations` (classic and v1 paths).
//!
//! - Images: `{"created", "data": [{"url" | "b64_json", "revised_prompt", "content_filter_results",
//!   "prompt_filter_results"}]}` (per image, as AOAI's `image_generation` example has it);
//!   `dall-e-3` answers one image, `url` by default; `gpt-image-1` answers `b64_json` only, with
//!   `usage`. The image is a real PNG of the requested size (1-bit, stored deflate), and a `url`
//!   points back at this simulator (`GET /sim/images/{seed}/{w}x{h}.png`, no key needed, as a
//!   SAS URL needs none), so a client can download it.
//! - Speech: a short valid audio body for `response_format` with its content type: `mp3`
//!   (`audio/mpeg`, silent MPEG-1 Layer III frames), `wav` (`audio/wav`, a quiet tone) or `pcm`
//!   (`audio/pcm`, 24 kHz 16-bit mono, the same tone); `opus`, `aac` and `flac` answer 400
//!   naming the formats the simulator makes. Length follows the input (about 60 ms a token,
//!   at most 3 s).
//! - Transcriptions and translations: multipart forms; `json` (default), `text`, `verbose_json`,
//!   `srt` and `vtt` answers.

use super::*;

const VOICES: &[&str] = &[
    "alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
];

// ---------------------------------------------------------------------------------------------
// Images.

pub(super) fn plan_images(at: &Deployed<'_>, body: &Value, base: String) -> Result<Plan, Reject> {
    let ModelKind::Image { b64_only } = at.kind else {
        return Err(operation_not_supported("imageGeneration", at.model));
    };
    let prompt = match body.get("prompt") {
        Some(Value::String(p)) if !p.trim().is_empty() => p.clone(),
        _ => return Err(invalid_request("'prompt' is a required property", "prompt")),
    };
    if prompt.chars().count() > 4000 {
        return Err(invalid_request(
            "'prompt' is too long: at most 4000 characters.",
            "prompt",
        ));
    }
    let max_n = if b64_only { 10 } else { 1 };
    let n = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=max_n).contains(&n) => n as usize,
            _ => {
                return Err(invalid_request(
                    &format!("Invalid 'n': {} supports 1 to {max_n} images.", at.model),
                    "n",
                ))
            }
        },
    };
    let sizes: &[&str] = if b64_only {
        &["1024x1024", "1536x1024", "1024x1536", "auto"]
    } else {
        &["1024x1024", "1792x1024", "1024x1792"]
    };
    let size = body
        .get("size")
        .and_then(Value::as_str)
        .unwrap_or("1024x1024");
    if !sizes.contains(&size) {
        return Err(invalid_request(
            &format!(
                "Invalid 'size': {size:?} is not one of {}.",
                sizes.join(", ")
            ),
            "size",
        ));
    }
    let (w, h) = match size.split_once('x') {
        Some((w, h)) => (w.parse().unwrap_or(1024), h.parse().unwrap_or(1024)),
        None => (1024, 1024),
    };
    let b64 = match body.get("response_format").and_then(Value::as_str) {
        None => b64_only,
        Some("b64_json") => true,
        Some("url") if !b64_only => false,
        Some(other) => {
            return Err(invalid_request(
                &format!("Invalid 'response_format': {other:?} is not supported by this model."),
                "response_format",
            ))
        }
    };
    let prompt_tokens = tokens::count(&prompt);
    let seed = stable_hash(&[prompt.as_bytes(), at.model.as_bytes()]);
    Ok(Plan::Custom {
        tokens: prompt_tokens,
        respond: Box::new(move |sim, reset| {
            let created = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let data: Vec<Value> = (0..n)
                .map(|i| {
                    let seed = seed.wrapping_add(i as u64);
                    let mut item = if b64 {
                        json!({"b64_json": base64_encode(&png(w, h, seed))})
                    } else {
                        json!({"url": format!("{base}/sim/images/{seed:016x}/{w}x{h}.png")})
                    };
                    if !b64_only {
                        item["revised_prompt"] =
                            json!(format!("A simulated rendering of: {prompt}"));
                    }
                    item["content_filter_results"] = image_filter_results(false);
                    item["prompt_filter_results"] = image_filter_results(true);
                    item
                })
                .collect();
            let mut body = json!({"created": created, "data": data});
            if b64_only {
                let out = 1056 * n;
                body["usage"] = json!({"input_tokens": prompt_tokens, "output_tokens": out,
                    "total_tokens": prompt_tokens + out,
                    "input_tokens_details": {"text_tokens": prompt_tokens, "image_tokens": 0}});
            }
            // Image generation takes seconds in AOAI; here it is the first-token delay.
            delayed_json(&sim.config, 0, body, reset)
        }),
    })
}

fn image_filter_results(prompt: bool) -> Value {
    let mut v = json!({"hate": safe(), "self_harm": safe(), "sexual": safe(), "violence": safe()});
    if prompt {
        v["profanity"] = json!({"filtered": false, "detected": false});
        v["jailbreak"] = json!({"filtered": false, "detected": false});
    }
    v
}

/// `GET /sim/images/{seed}/{w}x{h}.png`: the image an image `url` names.
pub(super) fn serve_image(path: &str) -> Option<Response> {
    let rest = path.strip_prefix("/sim/images/")?;
    let (seed, file) = rest.split_once('/')?;
    let seed = u64::from_str_radix(seed, 16).ok()?;
    let (w, h) = file.strip_suffix(".png")?.split_once('x')?;
    let (w, h): (u32, u32) = (w.parse().ok()?, h.parse().ok()?);
    if !(1..=2048).contains(&w) || !(1..=2048).contains(&h) {
        return None;
    }
    Some(binary(200, "image/png", png(w, h, seed)))
}

fn binary(status: u16, content_type: &'static str, bytes: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    r
}

/// A valid 1-bit greyscale PNG of `w`×`h` with diagonal stripes chosen by `seed`.
pub fn png(w: u32, h: u32, seed: u64) -> Vec<u8> {
    let row_bytes = w.div_ceil(8) as usize;
    let period = 8 + (seed % 56) as u32;
    let mut raw = Vec::with_capacity((row_bytes + 1) * h as usize);
    for y in 0..h {
        raw.push(0); // filter: none
        for bx in 0..row_bytes as u32 {
            let mut byte = 0u8;
            for bit in 0..8 {
                let x = bx * 8 + bit;
                if (x + y) % period < period / 2 {
                    byte |= 0x80 >> bit;
                }
            }
            raw.push(byte);
        }
    }
    // zlib: header, stored (uncompressed) deflate blocks of at most 65535 bytes, Adler-32.
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for byte in &raw {
        a = (a + u32::from(*byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());

    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[1, 0, 0, 0, 0]); // depth 1, greyscale, deflate, no filter, no interlace
    for (kind, data) in [(b"IHDR", ihdr), (b"IDAT", z), (b"IEND", Vec::new())] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(&data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    out
}

/// CRC-32 (IEEE, reflected), as PNG chunks carry it.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// ---------------------------------------------------------------------------------------------
// Speech.

pub(super) fn plan_speech(at: &Deployed<'_>, body: &Value) -> Result<Plan, Reject> {
    if at.kind != ModelKind::Speech {
        return Err(operation_not_supported("audioSpeech", at.model));
    }
    let input = match body.get("input") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(invalid_request("'input' is a required property", "input")),
    };
    if input.chars().count() > 4096 {
        return Err(invalid_request(
            "'input' is too long: at most 4096 characters.",
            "input",
        ));
    }
    match body.get("voice").and_then(Value::as_str) {
        Some(v) if VOICES.contains(&v) => {}
        _ => {
            return Err(invalid_request(
                &format!("'voice' must be one of {}.", VOICES.join(", ")),
                "voice",
            ))
        }
    }
    if let Some(speed) = body.get("speed").filter(|v| !v.is_null()) {
        if !speed.as_f64().is_some_and(|s| (0.25..=4.0).contains(&s)) {
            return Err(invalid_request(
                "Invalid 'speed': must be between 0.25 and 4.0.",
                "speed",
            ));
        }
    }
    let format = body
        .get("response_format")
        .and_then(Value::as_str)
        .unwrap_or("mp3")
        .to_string();
    let content_type = match format.as_str() {
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "pcm" => "audio/pcm",
        "opus" | "aac" | "flac" => {
            return Err(invalid_request(
                &format!("The local AOAI simulator makes mp3, wav and pcm audio, not {format}."),
                "response_format",
            ))
        }
        _ => {
            return Err(invalid_request(
                "Invalid 'response_format': expected mp3, opus, aac, flac, wav or pcm.",
                "response_format",
            ))
        }
    };
    let n = tokens::count(&input);
    let millis = (60 * n as u64).clamp(200, 3000);
    Ok(Plan::Custom {
        tokens: n,
        respond: Box::new(move |sim, reset| {
            let bytes = match format.as_str() {
                "mp3" => mp3_silence(millis),
                "wav" => wav(&tone(millis)),
                _ => tone(millis),
            };
            let mut r = delayed_json(&sim.config, 0, Value::Null, reset);
            let len = bytes.len();
            *r.body_mut() = scripted_body(
                vec![Piece {
                    wait: sim.config.first_token.min(MAX_DELAY),
                    bytes: Bytes::from(bytes),
                }],
                reset,
            );
            let h = r.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type),
            );
            h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
            r
        }),
    })
}

pub const SPEECH_RATE: u32 = 24_000;

/// A quiet 440 Hz tone, 24 kHz 16-bit little-endian mono samples (what `pcm` is).
pub fn tone(millis: u64) -> Vec<u8> {
    let samples = SPEECH_RATE as u64 * millis / 1000;
    (0..samples)
        .flat_map(|i| {
            let t = i as f64 / f64::from(SPEECH_RATE);
            let v = (t * 440.0 * std::f64::consts::TAU).sin() * 3000.0;
            (v as i16).to_le_bytes()
        })
        .collect()
}

/// `pcm` samples in a RIFF/WAVE container.
pub fn wav(pcm: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(44 + pcm.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + pcm.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&SPEECH_RATE.to_le_bytes());
    out.extend_from_slice(&(SPEECH_RATE * 2).to_le_bytes()); // byte rate
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(pcm.len() as u32).to_le_bytes());
    out.extend_from_slice(pcm);
    out
}

/// Silent MPEG-1 Layer III frames, 32 kbit/s, 32 kHz, mono: 144 bytes and 36 ms each. A zero
/// side info means no main data, which decoders play as silence.
pub fn mp3_silence(millis: u64) -> Vec<u8> {
    let frames = millis.div_ceil(36).max(1) as usize;
    let mut frame = [0u8; 144];
    frame[..4].copy_from_slice(&[0xff, 0xfb, 0x18, 0xc0]);
    frame.repeat(frames)
}

// ---------------------------------------------------------------------------------------------
// Transcriptions and translations.

/// One part of a multipart form.
#[derive(Debug, Clone)]
pub(super) struct Field {
    name: String,
    filename: Option<String>,
    value: Vec<u8>,
}

/// A `multipart/form-data` body, read leniently (the handler's gate is the strict reader).
#[derive(Debug, Clone, Default)]
pub(super) struct Form {
    fields: Vec<Field>,
}

impl Form {
    pub(super) fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Form, String> {
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.to_ascii_lowercase().starts_with("multipart/form-data") {
            return Err("Expected a multipart/form-data body with a 'file'.".into());
        }
        let boundary = ct
            .split(';')
            .filter_map(|p| p.trim().strip_prefix("boundary="))
            .next()
            .map(|b| b.trim_matches('"').to_string())
            .ok_or("The multipart body has no boundary.")?;
        let delimiter = format!("--{boundary}").into_bytes();
        let mut fields = Vec::new();
        let mut rest = body;
        // Each step moves past one delimiter, so this ends after at most body.len() steps.
        while let Some(at) = find(rest, &delimiter) {
            rest = &rest[at + delimiter.len()..];
            if rest.starts_with(b"--") {
                break;
            }
            let rest_part = rest.strip_prefix(b"\r\n").unwrap_or(rest);
            let end = find(rest_part, &delimiter).unwrap_or(rest_part.len());
            let part = &rest_part[..end];
            let Some(split) = find(part, b"\r\n\r\n") else {
                break;
            };
            let head = String::from_utf8_lossy(&part[..split]).to_string();
            let mut value = part[split + 4..].to_vec();
            if value.ends_with(b"\r\n") {
                value.truncate(value.len() - 2);
            }
            let disposition = head
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))
                .unwrap_or("");
            let param = |key: &str| {
                disposition
                    .split(';')
                    .filter_map(|p| p.trim().strip_prefix(key))
                    .next()
                    .map(|v| v.trim_matches('"').to_string())
            };
            if let Some(name) = param("name=") {
                fields.push(Field {
                    name,
                    filename: param("filename="),
                    value,
                });
            }
            rest = rest_part;
        }
        Ok(Form { fields })
    }

    fn text(&self, name: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|f| f.name == name && f.filename.is_none())
            .map(|f| String::from_utf8_lossy(&f.value).to_string())
    }

    fn file(&self) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == "file")
    }

    /// The form as a JSON object (text fields as strings, files as name and size), for the
    /// recorder and for the `model` of v1 calls.
    pub(super) fn as_json(&self) -> Value {
        let mut map = serde_json::Map::new();
        for f in &self.fields {
            let v = match &f.filename {
                Some(name) => json!({"filename": name, "bytes": f.value.len()}),
                None => json!(String::from_utf8_lossy(&f.value)),
            };
            map.insert(f.name.clone(), v);
        }
        Value::Object(map)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub(super) fn plan_transcription(
    sim: &AoaiSim,
    at: &Deployed<'_>,
    form: &Form,
    translate: bool,
) -> Result<Plan, Reject> {
    if at.kind != ModelKind::Transcription {
        let op = if translate {
            "audioTranslation"
        } else {
            "audioTranscription"
        };
        return Err(operation_not_supported(op, at.model));
    }
    let Some(file) = form.file().filter(|f| !f.value.is_empty()) else {
        return Err(invalid_request("'file' is a required property", "file"));
    };
    let name = file.filename.clone().unwrap_or_else(|| "audio".into());
    let size = file.value.len();
    let prompt = form.text("prompt").unwrap_or_default();
    let format = form
        .text("response_format")
        .unwrap_or_else(|| "json".into());
    if !["json", "text", "srt", "verbose_json", "vtt"].contains(&format.as_str()) {
        return Err(invalid_request(
            "Invalid 'response_format': expected json, text, srt, verbose_json or vtt.",
            "response_format",
        ));
    }
    let choice = answer(
        sim,
        at.deployment,
        &format!(
            "echo: Simulated {} of {name} ({size} bytes).",
            if translate {
                "translation"
            } else {
                "transcription"
            }
        ),
        0,
        None,
    );
    let text = choice.tokens.concat();
    let tokens = tokens::count(&prompt) + choice.tokens.len();
    let language = form.text("language").unwrap_or_else(|| "en".into());
    Ok(Plan::Custom {
        tokens,
        respond: Box::new(move |sim, reset| {
            let duration = 1.5;
            let (content_type, body) = match format.as_str() {
                "text" => ("text/plain; charset=utf-8", format!("{text}\n")),
                "srt" => (
                    "text/plain; charset=utf-8",
                    format!("1\n00:00:00,000 --> 00:00:01,500\n{text}\n\n"),
                ),
                "vtt" => (
                    "text/plain; charset=utf-8",
                    format!("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n{text}\n\n"),
                ),
                "verbose_json" => (
                    "application/json",
                    json!({"task": if translate { "translate" } else { "transcribe" },
                           "language": if translate { "english".to_string() } else { language.clone() },
                           "duration": duration, "text": text,
                           "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": duration,
                                         "text": text, "tokens": [], "temperature": 0.0,
                                         "avg_logprob": -0.2, "compression_ratio": 1.0,
                                         "no_speech_prob": 0.01}]})
                    .to_string(),
                ),
                _ => ("application/json", json!({"text": text}).to_string()),
            };
            let mut r = delayed_json(&sim.config, 0, Value::Null, reset);
            let len = body.len();
            *r.body_mut() = scripted_body(
                vec![Piece {
                    wait: sim.config.first_token.min(MAX_DELAY),
                    bytes: Bytes::from(body),
                }],
                reset,
            );
            let h = r.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type),
            );
            h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
            r
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn png_has_its_size_and_valid_chunks() {
        for (w, h) in [(1, 1), (7, 3), (1024, 1792)] {
            let p = png(w, h, 42);
            assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
            assert_eq!(&p[12..16], b"IHDR");
            assert_eq!(u32::from_be_bytes(p[16..20].try_into().unwrap()), w);
            assert_eq!(u32::from_be_bytes(p[20..24].try_into().unwrap()), h);
            // Walk the chunks: every CRC holds and the last is IEND.
            let mut at = 8;
            let mut last = [0u8; 4];
            while at < p.len() {
                let len = u32::from_be_bytes(p[at..at + 4].try_into().unwrap()) as usize;
                let crc = u32::from_be_bytes(p[at + 8 + len..at + 12 + len].try_into().unwrap());
                assert_eq!(crc32(&p[at + 4..at + 8 + len]), crc);
                last.copy_from_slice(&p[at + 4..at + 8]);
                at += 12 + len;
            }
            assert_eq!(at, p.len());
            assert_eq!(&last, b"IEND");
        }
    }

    #[test]
    fn audio_bodies_have_their_headers() {
        let w = wav(&tone(100));
        assert_eq!(&w[..4], b"RIFF");
        assert_eq!(&w[8..16], b"WAVEfmt ");
        assert_eq!(w.len(), 44 + 2 * 2400);
        assert_eq!(
            u32::from_le_bytes(w[4..8].try_into().unwrap()) as usize,
            w.len() - 8
        );
        let m = mp3_silence(100);
        assert_eq!(m.len() % 144, 0);
        assert!(m.chunks(144).all(|f| f[..2] == [0xff, 0xfb]));
    }

    #[test]
    fn forms_are_read_field_by_field() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=XyZ"),
        );
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhello\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n1234\r\n--XyZ--\r\n";
        let f = Form::parse(&headers, body).unwrap();
        assert_eq!(f.text("prompt").as_deref(), Some("hello"));
        assert_eq!(f.file().unwrap().value, b"RIFF\r\n1234");
        assert_eq!(f.as_json()["file"]["bytes"], 10);
    }
}
