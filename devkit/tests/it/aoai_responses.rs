//! The simulator's Responses API, black-box: JSON and SSE answers, the stored response's
//! routes, background polling and cancel, checked against the shapes the SDKs parse.

use crate::sim_support;

use std::time::{Duration, Instant};

use fwdproxy_devkit::sim::tokens;
use serde_json::{json, Value};
use sim_support::{error_code, named_events, Sim};

const R: &str = "/openai/v1/responses";

/// The event order a text answer has, whatever its length: `n` deltas in the middle.
fn expected_order(reasoning: bool, deltas: usize, last: &str) -> Vec<String> {
    let mut v = vec!["response.created", "response.in_progress"];
    if reasoning {
        v.extend(["response.output_item.added", "response.output_item.done"]);
    }
    v.extend(["response.output_item.added", "response.content_part.added"]);
    v.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    v.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        last,
    ]);
    v.into_iter().map(str::to_string).collect()
}

#[tokio::test]
async fn streams_have_the_reference_events_and_usage_matches_the_deltas() {
    let s = Sim::start(|_| {}).await;
    // The class of answers: short, long, cut by max_output_tokens, a reasoning model, items.
    let cases = [
        (
            json!({"model": "gpt-4o", "input": "echo: hi"}),
            false,
            "response.completed",
        ),
        (
            json!({"model": "gpt-4o", "input": "Tell me about the gateway in detail please"}),
            false,
            "response.completed",
        ),
        (
            json!({"model": "gpt-4o", "input": "echo: one two three four five six", "max_output_tokens": 3}),
            false,
            "response.incomplete",
        ),
        (
            json!({"model": "o3-mini", "input": [{"role": "user", "content": [{"type": "input_text", "text": "echo: think"}]}]}),
            true,
            "response.completed",
        ),
    ];
    for (mut body, reasoning, last) in cases {
        let plain: Value = s.post(R, body.clone()).await.json().await.unwrap();
        body["stream"] = json!(true);
        let resp = s.post(R, body.clone()).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let events = named_events(&resp.text().await.unwrap());
        let deltas: Vec<&str> = events
            .iter()
            .filter(|(n, _)| n == "response.output_text.delta")
            .map(|(_, d)| d["delta"].as_str().unwrap())
            .collect();
        let names: Vec<String> = events.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(
            names,
            expected_order(reasoning, deltas.len(), last),
            "{body}"
        );
        for (i, (name, data)) in events.iter().enumerate() {
            assert_eq!(&data["type"], name);
            assert_eq!(data["sequence_number"], i as u64, "numbers count from 0");
        }
        let id = events[0].1["response"]["id"].as_str().unwrap().to_string();
        assert!(id.starts_with("resp_"));
        assert_eq!(events[0].1["response"]["status"], "in_progress");
        assert!(events[0].1["response"]["usage"].is_null());
        let done = &events.last().unwrap().1["response"];
        assert_eq!(done["id"], id.as_str(), "one response id throughout");
        let text = done["output"].as_array().unwrap().last().unwrap()["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(deltas.concat(), text);
        let usage = &done["usage"];
        let reasoning_tokens = usage["output_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap();
        assert_eq!(reasoning_tokens > 0, reasoning);
        assert_eq!(
            usage["output_tokens"].as_u64().unwrap(),
            deltas.len() as u64 + reasoning_tokens
        );
        assert_eq!(usage["input_tokens_details"]["cached_tokens"], 0);
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()
            )
        );
        // The JSON answer is the same response.
        assert_eq!(plain["usage"], *usage);
        let content = |r: &Value| -> Vec<Value> {
            r["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| json!([o["type"], o["content"], o["status"]]))
                .collect()
        };
        assert_eq!(content(&plain), content(done));
        assert_eq!(plain["status"], done["status"]);
        let text_done = events
            .iter()
            .find(|(n, _)| n == "response.output_text.done")
            .unwrap();
        assert_eq!(text_done.1["text"], text.as_str());
        assert_eq!(
            text_done.1["item_id"],
            done["output"].as_array().unwrap().last().unwrap()["id"]
        );
    }
    let cut = &named_events(
        &s.post(R, json!({"model": "gpt-4o", "input": "echo: a b c d", "max_output_tokens": 2, "stream": true}))
            .await
            .text()
            .await
            .unwrap(),
    );
    let last = &cut.last().unwrap().1["response"];
    assert_eq!(last["status"], "incomplete");
    assert_eq!(last["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(last["usage"]["output_tokens"], 2);
    assert_eq!(tokens::count("a b"), 2);
}

#[tokio::test]
async fn stored_responses_can_be_read_listed_and_deleted() {
    let s = Sim::start(|_| {}).await;
    let created: Value = s
        .post(
            R,
            json!({"model": "gpt-4o", "instructions": "Be brief.",
                   "input": [{"role": "user", "content": "echo: first"},
                             {"role": "assistant", "content": "ok"},
                             {"role": "user", "content": "echo: second"}]}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    assert_eq!(created["output"][0]["content"][0]["text"], "second");
    let got: Value = s.get(&format!("{R}/{id}")).await.json().await.unwrap();
    assert_eq!(got, created);

    let items: Value = s
        .get(&format!("{R}/{id}/input_items"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(items["object"], "list");
    let data = items["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    // Newest first by default, as the API lists them.
    assert_eq!(data[0]["content"][0]["text"], "echo: second");
    assert_eq!(data[0]["content"][0]["type"], "input_text");
    assert_eq!(items["first_id"], data[0]["id"]);
    assert_eq!(items["has_more"], false);
    let page: Value = s
        .get(&format!("{R}/{id}/input_items?order=asc&limit=2"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["data"][0]["content"][0]["text"], "echo: first");
    assert_eq!(page["has_more"], true);
    let next: Value = s
        .get(&format!(
            "{R}/{id}/input_items?order=asc&after={}",
            page["last_id"].as_str().unwrap()
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(next["data"].as_array().unwrap().len(), 1);
    assert_eq!(next["data"][0]["content"][0]["text"], "echo: second");

    // A follow-up carries the previous turn's tokens.
    let follow: Value = s
        .post(
            R,
            json!({"model": "gpt-4o", "input": "echo: more", "previous_response_id": id}),
        )
        .await
        .json()
        .await
        .unwrap();
    let alone: Value = s
        .post(
            R,
            json!({"model": "gpt-4o", "input": "echo: more", "store": false}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        follow["usage"]["input_tokens"].as_u64().unwrap(),
        alone["usage"]["input_tokens"].as_u64().unwrap()
            + created["usage"]["total_tokens"].as_u64().unwrap()
    );
    // store: false is not kept.
    let gone = s
        .get(&format!("{R}/{}", alone["id"].as_str().unwrap()))
        .await;
    assert_eq!(error_code(gone, 404).await, "not_found");

    let deleted: Value = s
        .req(reqwest::Method::DELETE, &format!("{R}/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        deleted,
        json!({"id": id, "object": "response.deleted", "deleted": true})
    );
    for path in [format!("{R}/{id}"), format!("{R}/{id}/input_items")] {
        assert_eq!(error_code(s.get(&path).await, 404).await, "not_found");
    }
    let again = s
        .req(reqwest::Method::DELETE, &format!("{R}/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    let unknown_prev = s
        .post(
            R,
            json!({"model": "gpt-4o", "input": "x", "previous_response_id": id}),
        )
        .await;
    assert_eq!(unknown_prev.status(), 400);
    // Wrong methods on the item routes.
    let put = s
        .req(reqwest::Method::PUT, &format!("{R}/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 405);
    let cancel_get = s.get(&format!("{R}/{id}/cancel")).await;
    assert_eq!(cancel_get.status(), 405);
}

#[tokio::test]
async fn background_responses_are_polled_and_can_be_cancelled() {
    // Slow enough that a cancel always lands before the end.
    let slow = Sim::start(|c| c.first_token = Duration::from_secs(120)).await;
    let queued: Value = slow
        .post(
            R,
            json!({"model": "gpt-4o", "input": "echo: later", "background": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(queued["status"], "queued");
    assert_eq!(queued["background"], true);
    assert_eq!(queued["output"], json!([]));
    assert!(queued["usage"].is_null());
    let id = queued["id"].as_str().unwrap();
    let polled: Value = slow.get(&format!("{R}/{id}")).await.json().await.unwrap();
    assert_eq!(polled["status"], "queued");
    let cancelled: Value = slow
        .post(&format!("{R}/{id}/cancel"), json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    let after: Value = slow.get(&format!("{R}/{id}")).await.json().await.unwrap();
    assert_eq!(after["status"], "cancelled");
    assert!(after["usage"].is_null());

    // Only background responses can be cancelled; background needs store.
    let fast = Sim::start(|c| c.first_token = Duration::from_millis(100)).await;
    let plain: Value = fast
        .post(R, json!({"model": "gpt-4o", "input": "echo: now"}))
        .await
        .json()
        .await
        .unwrap();
    let refused = fast
        .post(
            &format!("{R}/{}/cancel", plain["id"].as_str().unwrap()),
            json!({}),
        )
        .await;
    assert_eq!(refused.status(), 400);
    let no_store = fast
        .post(
            R,
            json!({"model": "gpt-4o", "input": "x", "background": true, "store": false}),
        )
        .await;
    assert_eq!(no_store.status(), 400);

    // Polling sees it finish: queued/in_progress, then completed with output and usage.
    let bg: Value = fast
        .post(
            R,
            json!({"model": "gpt-4o", "input": "echo: done soon", "background": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = bg["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut statuses = Vec::new();
    let finished = loop {
        assert!(Instant::now() < deadline, "never completed: {statuses:?}");
        let v: Value = fast.get(&format!("{R}/{id}")).await.json().await.unwrap();
        let st = v["status"].as_str().unwrap().to_string();
        if statuses.last() != Some(&st) {
            statuses.push(st.clone());
        }
        if st == "completed" {
            break v;
        }
        assert!(["queued", "in_progress"].contains(&st.as_str()), "{st}");
        tokio::time::sleep(Duration::from_millis(10)).await; // a poll interval, not a sync
    };
    assert_eq!(finished["output"][0]["content"][0]["text"], "done soon");
    assert_eq!(finished["usage"]["output_tokens"], 2);
    // Cancelling a finished response changes nothing.
    let late: Value = fast
        .post(&format!("{R}/{id}/cancel"), json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(late["status"], "completed");
}

#[tokio::test]
async fn responses_need_a_chat_model_and_an_input() {
    let s = Sim::start(|_| {}).await;
    let emb = s
        .post(R, json!({"model": "text-embedding-3-small", "input": "x"}))
        .await;
    assert_eq!(error_code(emb, 400).await, "OperationNotSupported");
    for body in [
        json!({"model": "gpt-4o"}),
        json!({"model": "gpt-4o", "input": []}),
        json!({"model": "gpt-4o", "input": 7}),
        json!({"model": "gpt-4o", "input": "x", "stream": "yes"}),
    ] {
        assert_eq!(s.post(R, body.clone()).await.status(), 400, "{body}");
    }
    // Reset mid-stream: the client sees a broken body, as from a dropped connection.
    let resp = s
        .req(reqwest::Method::POST, R)
        .header("x-sim-fail", "reset")
        .json(&json!({"model": "gpt-4o", "input": "echo: a b c d e f", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.is_err());
}

#[tokio::test]
async fn a_stored_stream_can_be_resumed_after_a_sequence_number() {
    let s = Sim::start(|_| {}).await;
    let live = named_events(
        &s.post(
            R,
            json!({"model": "gpt-4o", "input": "echo: a b c", "stream": true}),
        )
        .await
        .text()
        .await
        .unwrap(),
    );
    let id = live[0].1["response"]["id"].as_str().unwrap();
    let all = named_events(
        &s.get(&format!("{R}/{id}?stream=true"))
            .await
            .text()
            .await
            .unwrap(),
    );
    // The replay is the live stream, event for event.
    assert_eq!(all, live);
    for after in [0, 3, live.len() as u64 - 2, live.len() as u64 + 5] {
        let resumed = named_events(
            &s.get(&format!("{R}/{id}?stream=true&starting_after={after}"))
                .await
                .text()
                .await
                .unwrap(),
        );
        let expected: Vec<_> = live.iter().skip(after as usize + 1).cloned().collect();
        assert_eq!(resumed, expected, "starting_after={after}");
    }
    // A background response started without stream can be streamed too.
    let bg: Value = s
        .post(
            R,
            json!({"model": "gpt-4o", "input": "echo: later", "background": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    let events = named_events(
        &s.get(&format!("{R}/{}?stream=true", bg["id"].as_str().unwrap()))
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(events[0].1["response"]["status"], "queued");
    assert_eq!(events.last().unwrap().0, "response.completed");
    let bad = s
        .get(&format!("{R}/{id}?stream=true&starting_after=x"))
        .await;
    assert_eq!(bad.status(), 400);
}
