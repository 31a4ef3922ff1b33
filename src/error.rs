//! The one error type of the handler and its AOAI-shaped response.
//!
//! Every answer the handler produces itself (as opposed to AOAI's answers, which pass through
//! unchanged) comes from an [`AppError`]. The status mapping lives in [`AppError::status`] and the
//! body shape in [`AppError::into_response`], so a client sees the same
//! `{"error":{"code":"…","message":"…"}}` document that Azure OpenAI itself sends, and SDKs that
//! already parse AOAI errors parse ours.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde_json::json;

/// Errors the handler answers with itself.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The path is malformed (bad characters, `..`, encoded slashes, empty segments).
    #[error("{0}")]
    BadPath(String),
    /// A required query parameter is missing or malformed.
    #[error("{0}")]
    BadQuery(String),
    /// The path is well-formed but names nothing we serve.
    #[error("Resource not found")]
    NotFound,
    /// The route exists but not for this method.
    #[error("The requested method is not allowed for this resource")]
    MethodNotAllowed,
    /// No internal key, or a wrong one.
    #[error("Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.")]
    Unauthorized,
    /// The request headers exceed 32 KB in total (nothing legitimate sends that much; the
    /// gateway and the Functions host have limits of that order).
    #[error("The request headers exceed the limit of {limit} bytes in total")]
    HeadersTooLarge { limit: usize },
    /// The request body exceeds the configured limit.
    #[error("The request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    /// The body cannot be inspected: not JSON, wrong content type, a field of the wrong type.
    #[error("{0}")]
    InvalidBody(String),
    /// The user check requires a `user` field and the body has none.
    #[error("{0}")]
    MissingUser(String),
    /// The `user` is not in the registry.
    #[error("The user is not registered to use this service")]
    UnregisteredUser,
    /// Content Safety blocked the prompt; the value is AOAI's `content_filter_result` object.
    #[error("The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry. To learn more about our content filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766")]
    ContentFiltered(serde_json::Value),
    /// A batch input file has lines that would have been refused as online calls; the message
    /// names their `custom_id`s. The whole upload is refused.
    #[error("{0}")]
    BatchInputRefused(String),
    /// Screening is required but Content Safety could not answer (fail closed).
    #[error("The prompt could not be screened for content safety right now; retry later")]
    ScreeningUnavailable { retry_after: Option<u64> },
    /// Screening the prompt would take more Content Safety calls than one request may make.
    #[error("The prompt is too long to be screened for content safety: it needs more screening calls than one request may make")]
    TooLongToScreen,
    /// Too many requests are being screened in this instance right now.
    #[error("Too many requests are being screened for content safety right now; retry after the number of seconds in retry-after")]
    ScreeningBusy { retry_after: u64 },
    /// A refusal whose abuse record could not be made durable (journal unwritable and no
    /// Cosmos DB acknowledgement): the request is not forwarded, and not answered as refused.
    #[error("The request could not be recorded as required; retry later")]
    AuditUnavailable,
    /// The caller's token budget (`CALLER_TOKEN_LIMITS`) cannot cover this request now;
    /// `retry_after_ms` is when it can (`None`: the request alone is over the per-minute limit).
    #[error("{}", token_budget_message(*retry_after_ms))]
    TokenBudgetExceeded { retry_after_ms: Option<u64> },
    /// Every AOAI resource of this handler (the primary and its backups) is cooling down after a
    /// 429; `retry_after_ms` is the shortest of their waits.
    #[error("Every Azure OpenAI resource behind this proxy is over its rate limit right now; retry after the number of seconds in retry-after (milliseconds in retry-after-ms)")]
    AllThrottled { retry_after_ms: u64 },
    /// No AOAI resource can take a request now: the health route's answer with
    /// `HEALTH_REFLECTS_CAPACITY` while every resource is cooling down or unreachable, and a
    /// forward that found nothing it could even try (with backups, open circuits alone never
    /// lead here: the earliest-opened one is tried instead). `retry_after_ms` is the shortest
    /// wait until one may.
    #[error("No Azure OpenAI resource behind this proxy can take requests right now; retry after the number of seconds in retry-after")]
    UpstreamUnavailable { retry_after_ms: u64 },
    /// The upstream could not be reached or broke the exchange before answering.
    #[error("The upstream Azure OpenAI service could not be reached")]
    BadGateway,
    /// The upstream did not answer within the configured time.
    #[error("The upstream Azure OpenAI service did not answer in time")]
    GatewayTimeout,
    /// The client did not finish sending a body the gate had to read within `AOAI_TIMEOUT_MS`
    /// (a client's fault: never reported as an upstream timeout).
    #[error("The request body did not arrive in time")]
    RequestTimeout,
    /// A failure inside the handler; details go to the log, not to the client.
    #[error("The proxy failed to process the request")]
    Internal,
}

fn token_budget_message(retry_after_ms: Option<u64>) -> &'static str {
    match retry_after_ms {
        Some(_) => {
            "This caller's token budget per minute is used up; retry after the number of seconds \
             in retry-after (milliseconds in retry-after-ms)"
        }
        None => {
            "This request alone needs more tokens than this caller's budget per minute allows; \
             lower max_tokens or split the prompt"
        }
    }
}

impl AppError {
    /// The one status mapping.
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadPath(_) | AppError::BadQuery(_) => StatusCode::BAD_REQUEST,
            AppError::InvalidBody(_)
            | AppError::MissingUser(_)
            | AppError::ContentFiltered(_)
            | AppError::BatchInputRefused(_) => StatusCode::BAD_REQUEST,
            AppError::UnregisteredUser => StatusCode::FORBIDDEN,
            AppError::ScreeningUnavailable { .. } | AppError::AuditUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AppError::TooLongToScreen => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::ScreeningBusy { .. }
            | AppError::TokenBudgetExceeded { .. }
            | AppError::AllThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::UpstreamUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AppError::NotFound => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            AppError::BadGateway => StatusCode::BAD_GATEWAY,
            AppError::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            AppError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            AppError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable `error.code`. Where AOAI has a code for the same condition we use it
    /// (`401`, `404`, `DeploymentNotFound`-style codes are numeric strings or names in AOAI; we
    /// keep names stable and documented in the README).
    pub fn code(&self) -> &'static str {
        match self {
            AppError::BadPath(_) => "invalid_path",
            AppError::BadQuery(_) => "invalid_query",
            AppError::InvalidBody(_) => "invalid_body",
            AppError::MissingUser(_) => "missing_user",
            AppError::UnregisteredUser => "unregistered_user",
            AppError::ContentFiltered(_) => "content_filter",
            AppError::BatchInputRefused(_) => "batch_input_refused",
            AppError::ScreeningUnavailable { .. } => "content_safety_unavailable",
            AppError::TooLongToScreen => "prompt_too_long",
            AppError::ScreeningBusy { .. } => "screening_busy",
            AppError::AuditUnavailable => "audit_unavailable",
            AppError::TokenBudgetExceeded { .. } => "token_budget_exceeded",
            AppError::NotFound => "404",
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::Unauthorized => "401",
            AppError::PayloadTooLarge { .. } => "request_too_large",
            AppError::HeadersTooLarge { .. } => "request_headers_too_large",
            // AOAI's own code for its 429, so clients that match on it match ours
            AppError::AllThrottled { .. } => "429",
            AppError::UpstreamUnavailable { .. } => "upstream_unavailable",
            AppError::BadGateway => "upstream_unreachable",
            AppError::GatewayTimeout => "upstream_timeout",
            AppError::RequestTimeout => "request_timeout",
            AppError::Internal => "internal_error",
        }
    }

    /// The AOAI-shaped JSON body.
    pub fn body(&self) -> serde_json::Value {
        match self {
            // AOAI's own prompt-filter error, field for field, so clients that already handle
            // Azure's filter handle ours (`innererror`, the spelling clients read).
            AppError::ContentFiltered(result) => json!({
                "error": {
                    "code": "content_filter",
                    "message": self.to_string(),
                    "param": "prompt",
                    "type": null,
                    "status": 400,
                    "innererror": {
                        "code": "ResponsibleAIPolicyViolation",
                        "content_filter_result": result,
                    }
                }
            }),
            AppError::MissingUser(_) | AppError::UnregisteredUser => json!({
                "error": { "code": self.code(), "message": self.to_string(), "param": "user" }
            }),
            _ => json!({ "error": { "code": self.code(), "message": self.to_string() } }),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let retry_after = match self {
            AppError::ScreeningUnavailable { retry_after } => retry_after,
            AppError::ScreeningBusy { retry_after } => Some(retry_after),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let AppError::TokenBudgetExceeded {
            retry_after_ms: Some(ms),
        }
        | AppError::AllThrottled { retry_after_ms: ms }
        | AppError::UpstreamUnavailable { retry_after_ms: ms } = self
        {
            let h = response.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
            h.insert("retry-after-ms", HeaderValue::from(ms));
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_aoai_shaped() {
        let all = [
            AppError::BadPath("x".into()),
            AppError::BadQuery("x".into()),
            AppError::NotFound,
            AppError::MethodNotAllowed,
            AppError::Unauthorized,
            AppError::PayloadTooLarge { limit: 1 },
            AppError::HeadersTooLarge { limit: 1 },
            AppError::InvalidBody("x".into()),
            AppError::MissingUser("x".into()),
            AppError::UnregisteredUser,
            AppError::ContentFiltered(json!({})),
            AppError::BatchInputRefused("x".into()),
            AppError::ScreeningUnavailable { retry_after: None },
            AppError::TooLongToScreen,
            AppError::ScreeningBusy { retry_after: 1 },
            AppError::AuditUnavailable,
            AppError::TokenBudgetExceeded {
                retry_after_ms: Some(1),
            },
            AppError::TokenBudgetExceeded {
                retry_after_ms: None,
            },
            AppError::AllThrottled { retry_after_ms: 1 },
            AppError::UpstreamUnavailable { retry_after_ms: 1 },
            AppError::BadGateway,
            AppError::GatewayTimeout,
            AppError::RequestTimeout,
            AppError::Internal,
        ];
        for e in all {
            let body = e.body();
            assert!(body["error"]["code"].is_string(), "{e:?}");
            assert!(!body["error"]["message"].as_str().unwrap().is_empty());
            assert!(e.status().is_client_error() || e.status().is_server_error());
        }
    }
}
