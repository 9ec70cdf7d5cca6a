//! The merchant-facing error object (`{"error": {type, code, message, param}}`) and its HTTP status.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decline_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// Seconds the client should wait before retrying (429 and 503 only).
    #[serde(skip)]
    pub retry_after_s: Option<u32>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: &'a ApiError,
}

impl ApiError {
    fn new(
        status: u16,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
            decline_code: None,
            payment_id: None,
            retry_after_s: None,
        }
    }

    /// 400 for a bad parameter; `param` names it the way a merchant wrote it (`customer[email]`).
    pub fn invalid(
        code: &'static str,
        param: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let mut e = Self::new(400, "invalid_request_error", code, message);
        e.param = Some(param.into());
        e
    }

    /// 400 for a body that cannot be read at all.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", "invalid_json", message)
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            "body_too_large",
            format!("The request body is larger than the limit of {limit} bytes."),
        )
    }

    pub fn idempotency_mismatch() -> Self {
        Self::new(
            400,
            "idempotency_error",
            "idempotency_key_reused",
            "Keys for idempotent requests can only be used with the same parameters they were first used with.",
        )
    }

    pub fn idempotency_in_flight() -> Self {
        Self::new(
            409,
            "idempotency_error",
            "idempotency_key_in_use",
            "A request with this idempotency key is still being processed; retry once it has finished.",
        )
    }

    pub fn rate_limited(retry_after_s: u32) -> Self {
        let mut e = Self::new(
            429,
            "rate_limit_error",
            "rate_limit",
            "Too many requests for this merchant.",
        );
        e.retry_after_s = Some(retry_after_s);
        e
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(503, "api_error", "service_unavailable", message);
        e.retry_after_s = Some(1);
        e
    }

    pub fn declined(
        decline_code: impl Into<String>,
        payment_id: String,
        message: impl Into<String>,
    ) -> Self {
        let mut e = Self::new(402, "card_error", "card_declined", message);
        e.decline_code = Some(decline_code.into());
        e.payment_id = Some(payment_id);
        e
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&Envelope { error: self }).expect("error object always serializes")
    }
}
