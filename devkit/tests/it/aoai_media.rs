//! The simulator's images, speech and transcriptions, and deployments declared `name=model`:
//! what each model serves, and AOAI's own errors for what it does not.

use crate::sim_support;

use fwdproxy_devkit::sim::aoai::{parse_deployments, Deployment};
use serde_json::{json, Value};
use sim_support::{error_code, Sim, Q};

fn op(deployment: &str, op: &str) -> String {
    format!("/openai/deployments/{deployment}/{op}?{Q}")
}

fn b64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let n = chunk.iter().fold(0u32, |acc, c| (acc << 6) | val(*c));
        let pad = chunk.iter().filter(|c| **c == b'=').count();
        out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8][..3 - pad]);
    }
    out
}

fn png_size(p: &[u8]) -> (u32, u32) {
    assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
    (
        u32::from_be_bytes(p[16..20].try_into().unwrap()),
        u32::from_be_bytes(p[20..24].try_into().unwrap()),
    )
}

#[tokio::test]
async fn declared_models_decide_the_operations() {
    let list = parse_deployments("chat=gpt-4o,emb=text-embedding-3-small,img=dall-e-3,tts=tts-1,stt=whisper,old=gpt-35-turbo-instruct").unwrap();
    let s = Sim::start(|c| c.deployments = Some(list)).await;
    let chat = json!({"messages": [{"role": "user", "content": "echo: hi"}]});
    let emb = json!({"input": "hello"});
    let img = json!({"prompt": "a lighthouse"});
    let tts = json!({"input": "hello", "voice": "alloy"});
    let cmp = json!({"prompt": "echo: hi"});
    let ops = [
        ("chat/completions", &chat),
        ("embeddings", &emb),
        ("images/generations", &img),
        ("audio/speech", &tts),
        ("completions", &cmp),
    ];
    // Each deployment serves exactly its model's operation; every other answers
    // OperationNotSupported naming the model.
    for (deployment, model, serves) in [
        ("chat", "gpt-4o", "chat/completions"),
        ("emb", "text-embedding-3-small", "embeddings"),
        ("img", "dall-e-3", "images/generations"),
        ("tts", "tts-1", "audio/speech"),
        ("old", "gpt-35-turbo-instruct", "completions"),
        ("stt", "whisper", "-"),
    ] {
        for (path, body) in ops {
            let resp = s.post(&op(deployment, path), (*body).clone()).await;
            if path == serves {
                assert_eq!(resp.status(), 200, "{deployment} {path}");
            } else {
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap();
                assert_eq!(status, 400, "{deployment} {path}");
                assert_eq!(body["error"]["code"], "OperationNotSupported");
                assert!(body["error"]["message"].as_str().unwrap().contains(model));
            }
        }
    }
    // The answer names the model, not the deployment.
    let e: Value = s
        .post(&op("emb", "embeddings"), emb.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(e["model"], "text-embedding-3-small");
    assert_eq!(e["data"][0]["embedding"].as_array().unwrap().len(), 1536);
    let c: Value = s
        .post(&op("chat", "chat/completions"), chat.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(c["model"], "gpt-4o");
    // v1: the body's model is the deployment name.
    let v1: Value = s
        .post(
            "/openai/v1/embeddings",
            json!({"model": "emb", "input": "x", "dimensions": 8}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v1["data"][0]["embedding"].as_array().unwrap().len(), 8);
    // Undeclared names do not exist; the list names the deployments.
    let missing = s
        .post(&op("gpt-4o", "chat/completions"), chat.clone())
        .await;
    assert_eq!(error_code(missing, 404).await, "DeploymentNotFound");
    let models: Value = s.get("/openai/v1/models").await.json().await.unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat", "emb", "img", "tts", "stt", "old"]);

    // Without a declaration a name is only a guess: `emb` is taken for a chat model.
    let guess = Sim::start(|_| {}).await;
    let resp = guess.post(&op("emb", "embeddings"), emb).await;
    assert_eq!(error_code(resp, 400).await, "OperationNotSupported");
    assert_eq!(Deployment::named("x").model, "x");
}

#[tokio::test]
async fn images_come_in_aoai_shapes() {
    let s = Sim::start(|_| {}).await;
    let resp = s
        .post(
            &op("dall-e-3", "images/generations"),
            json!({"prompt": "a red fox", "size": "1792x1024"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body["created"].as_u64().unwrap() > 0);
    let item = &body["data"][0];
    assert!(item["revised_prompt"]
        .as_str()
        .unwrap()
        .contains("a red fox"));
    assert_eq!(
        item["content_filter_results"]["violence"]["filtered"],
        false
    );
    assert_eq!(item["prompt_filter_results"]["hate"]["severity"], "safe");
    // The url serves a PNG of the requested size, without a key (as a SAS URL).
    let url = item["url"].as_str().unwrap();
    assert!(url.starts_with(&s.server.url()), "{url}");
    let png = s.client.get(url).send().await.unwrap();
    assert_eq!(png.headers()["content-type"], "image/png");
    assert_eq!(png_size(&png.bytes().await.unwrap()), (1792, 1024));

    let b64: Value = s
        .post(
            &op("dall-e-3", "images/generations"),
            json!({"prompt": "a fox", "response_format": "b64_json"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(b64["data"][0]["url"].is_null());
    assert_eq!(
        png_size(&b64_decode(b64["data"][0]["b64_json"].as_str().unwrap())),
        (1024, 1024)
    );

    let gpt_image: Value = s
        .post(
            &op("gpt-image-1", "images/generations"),
            json!({"prompt": "a fox", "n": 2, "size": "1024x1536"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(gpt_image["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        png_size(&b64_decode(
            gpt_image["data"][1]["b64_json"].as_str().unwrap()
        )),
        (1024, 1536)
    );
    assert!(gpt_image["usage"]["total_tokens"].as_u64().unwrap() > 0);

    for (deployment, body) in [
        ("dall-e-3", json!({})),
        ("dall-e-3", json!({"prompt": ""})),
        ("dall-e-3", json!({"prompt": "x", "n": 2})),
        ("dall-e-3", json!({"prompt": "x", "size": "512x512"})),
        ("dall-e-3", json!({"prompt": "x", "response_format": "gif"})),
        (
            "gpt-image-1",
            json!({"prompt": "x", "response_format": "url"}),
        ),
    ] {
        let resp = s
            .post(&op(deployment, "images/generations"), body.clone())
            .await;
        assert_eq!(
            error_code(resp, 400).await,
            "BadRequest",
            "{deployment} {body}"
        );
    }
    // What the simulator saw is what the client sent.
    assert!(s
        .sim
        .recorder
        .seen()
        .iter()
        .any(|r| r.body["prompt"] == "a red fox"));
}

#[tokio::test]
async fn speech_is_valid_audio_with_its_content_type() {
    let s = Sim::start(|_| {}).await;
    let path = op("tts-1", "audio/speech");
    let say = |format: Option<&str>| {
        let mut body = json!({"input": "Hello from the simulator.", "voice": "nova"});
        if let Some(f) = format {
            body["response_format"] = json!(f);
        }
        s.post(&path, body)
    };
    let mp3 = say(None).await;
    assert_eq!(mp3.status(), 200);
    assert_eq!(mp3.headers()["content-type"], "audio/mpeg");
    let bytes = mp3.bytes().await.unwrap();
    assert!(!bytes.is_empty() && bytes.len() % 144 == 0);
    assert_eq!(&bytes[..2], &[0xff, 0xfb]);

    let wav = say(Some("wav")).await;
    assert_eq!(wav.headers()["content-type"], "audio/wav");
    let w = wav.bytes().await.unwrap();
    assert_eq!(&w[..4], b"RIFF");
    assert_eq!(&w[8..12], b"WAVE");
    assert_eq!(u32::from_le_bytes(w[24..28].try_into().unwrap()), 24_000);
    assert_eq!(
        u32::from_le_bytes(w[40..44].try_into().unwrap()) as usize,
        w.len() - 44
    );

    let pcm = say(Some("pcm")).await;
    assert_eq!(pcm.headers()["content-type"], "audio/pcm");
    let p = pcm.bytes().await.unwrap();
    assert_eq!(&p[..], &w[44..], "pcm is the wav's samples");

    for body in [
        json!({"voice": "nova"}),
        json!({"input": "x"}),
        json!({"input": "x", "voice": "robot"}),
        json!({"input": "x", "voice": "nova", "response_format": "flac"}),
        json!({"input": "x", "voice": "nova", "speed": 9}),
    ] {
        let resp = s.post(&op("tts-1", "audio/speech"), body.clone()).await;
        assert_eq!(error_code(resp, 400).await, "BadRequest", "{body}");
    }
}

#[tokio::test]
async fn transcriptions_read_the_form() {
    let s = Sim::start(|_| {}).await;
    // A multipart body as the SDKs send it.
    let form = |format: &str| {
        format!(
            "--B0undary\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nnames: Contoso\r\n\
             --B0undary\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\n{format}\r\n\
             --B0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"hello.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\nRIFF....WAVE\r\n--B0undary--\r\n"
        )
    };
    let send = |path: String, body: String| {
        s.req(reqwest::Method::POST, &path)
            .header("content-type", "multipart/form-data; boundary=B0undary")
            .body(body)
            .send()
    };
    let json: Value = send(op("whisper", "audio/transcriptions"), form("json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(json["text"].as_str().unwrap().contains("hello.wav"));
    let seen = s.sim.recorder.seen();
    assert_eq!(seen[0].body["prompt"], "names: Contoso");
    assert_eq!(seen[0].body["file"]["bytes"], 12);
    let text = send(op("whisper", "audio/translations"), form("text"))
        .await
        .unwrap();
    assert!(text.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert!(text.text().await.unwrap().contains("translation"));
    let verbose: Value = send(op("whisper", "audio/transcriptions"), form("verbose_json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(verbose["task"], "transcribe");
    // No file, or not a form: AOAI's 400.
    let no_file = send(
        op("whisper", "audio/transcriptions"),
        "--B0undary\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n--B0undary--\r\n".into(),
    )
    .await
        .unwrap();
    assert_eq!(error_code(no_file, 400).await, "BadRequest");
    let not_form = s
        .post(&op("whisper", "audio/transcriptions"), json!({"file": "x"}))
        .await;
    assert_eq!(error_code(not_form, 400).await, "BadRequest");
}
